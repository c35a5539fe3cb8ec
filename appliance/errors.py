"""The appliance's error tree, and the one place each error becomes a reply.

Frontends raise or catch these and call `http_reply` at the edge; the access log records
`log_result`. Protocol errors come from `protocols/` (h11/wsproto style: Remote = the peer broke
the protocol, Local = we did); the others are ours.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from .protocols.http1 import LocalProtocolError, ProtocolError, RemoteProtocolError
from .protocols.proxy_auth import challenge


class UpstreamError(Exception):
    """The origin could not be used. `kind`: dns | connect | tls | timeout | protocol | closed."""

    def __init__(self, kind: str, target: str, detail: str, errno: int | None = None) -> None:
        super().__init__(f"{kind} error for {target}: {detail}")
        self.kind = kind
        self.target = target
        self.detail = detail
        self.errno = errno          # the OS error of a failed connect, if that is what it was


class ClientError(Exception):
    """The client went away or stalled past its idle timeout; nobody is left to answer."""


class AuthRequired(Exception):
    """The request has no valid proxy credentials: 407 with a Basic challenge for `realm`."""

    def __init__(self, realm: str, reason: str) -> None:
        super().__init__(reason)
        self.realm = realm
        self.reason = reason


class PolicyDenied(Exception):
    """A rule (or the default deny) refused the request; `rule` names it for the admin."""

    def __init__(self, rule: str, reason: str = "denied by policy", status: int = 403) -> None:
        super().__init__(f"{reason}: {rule}")
        self.rule = rule
        self.reason = reason
        self.status = status


@dataclass(frozen=True)
class Reply:
    status: int
    reason: str
    body: str          # short text for the client: what happened and who decided
    log_error: str     # what the access log's `error` field says
    headers: tuple = ()   # extra fields of the answer (the 407's challenge)


_UPSTREAM_STATUS = {"timeout": 504}


def http_reply(exc: BaseException) -> Reply:
    """Map any error on the data path to the HTTP answer and the log entry (the only such map)."""
    if isinstance(exc, AuthRequired):
        return Reply(407, _REASONS[407], f"{exc.reason}\n", f"auth: {exc.reason}", (challenge(exc.realm),))
    if isinstance(exc, PolicyDenied):
        return Reply(exc.status, _REASONS.get(exc.status, "Forbidden"),
                     f"{exc.reason}: {exc.rule}\n", f"denied: {exc.rule}")
    if isinstance(exc, UpstreamError):
        status = _UPSTREAM_STATUS.get(exc.kind, 502)
        return Reply(status, _REASONS[status], f"{_REASONS[status]}: {exc}\n", f"upstream {exc.kind}: {exc.detail}")
    if isinstance(exc, RemoteProtocolError):
        status = exc.status
        return Reply(status, _REASONS.get(status, "Bad Request"), f"{exc}\n", f"protocol: {exc}")
    if isinstance(exc, (LocalProtocolError, ProtocolError)):
        return Reply(502, "Bad Gateway", f"cannot forward this message: {exc}\n", f"local protocol: {exc}")
    return Reply(500, "Internal Server Error", "internal error\n", f"internal: {type(exc).__name__}: {exc}")


def socks5_reply(exc: BaseException) -> tuple[int, str]:
    """Map an error on the SOCKS5 path to (REP code, access-log error) (RFC 1928 §6)."""
    from .protocols import socks5
    if isinstance(exc, PolicyDenied):
        return socks5.REP_NOT_ALLOWED, f"denied: {exc.rule}"
    if isinstance(exc, UpstreamError):
        code = {"dns": socks5.REP_HOST_UNREACHABLE, "timeout": socks5.REP_TTL_EXPIRED}.get(exc.kind)
        if code is None:
            code = {errno.ECONNREFUSED: socks5.REP_CONNECTION_REFUSED,
                    errno.ENETUNREACH: socks5.REP_NETWORK_UNREACHABLE,
                    errno.EHOSTUNREACH: socks5.REP_HOST_UNREACHABLE,
                    errno.ETIMEDOUT: socks5.REP_TTL_EXPIRED}.get(exc.errno, socks5.REP_GENERAL_FAILURE)
        return code, f"upstream {exc.kind}: {exc.detail}"
    if isinstance(exc, socks5.Socks5Error):
        return exc.reply if exc.reply is not None else socks5.REP_GENERAL_FAILURE, f"protocol: {exc}"
    return socks5.REP_GENERAL_FAILURE, f"internal: {type(exc).__name__}: {exc}"


_REASONS = {
    400: "Bad Request", 403: "Forbidden", 404: "Not Found", 407: "Proxy Authentication Required",
    405: "Method Not Allowed", 408: "Request Timeout", 421: "Misdirected Request",
    429: "Too Many Requests",
    500: "Internal Server Error", 501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable",
    504: "Gateway Timeout", 505: "HTTP Version Not Supported", 508: "Loop Detected",
}

