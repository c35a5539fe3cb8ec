"""sd_notify(3): tells systemd that the appliance is ready, reloading or stopping.

Where it sits: beside the data path, in the lifecycle of `server.py` (and of the supervisor's
process when there are workers). The Debian unit (`packaging/debian/appliance.service`) is
`Type=notify`: systemd counts the service as started, and `systemctl start` returns, only once
the process says `READY=1`, which it says after every listener is accepting.

The protocol is one datagram of newline-separated `KEY=value` fields to the AF_UNIX socket named
by `$NOTIFY_SOCKET` (a leading "@" means the abstract namespace), so no library is needed
(python3-systemd's `daemon.notify` does the same). Outside systemd the variable is unset and
nothing is sent. A worker of the supervisor never sends: with `NotifyAccess=main` systemd would
ignore it, and only the supervisor knows when all of them are ready. Never raises: the service
must not fail because its manager went away; a failure is logged.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("appliance.systemd")

NOTIFY_ENV = "NOTIFY_SOCKET"


def _address(name: str) -> str | bytes:
    return b"\0" + name[1:].encode() if name.startswith("@") else name


def notify(*fields: str) -> bool:
    """Send `fields` ("READY=1", "STATUS=...") to systemd; False when nothing was sent."""
    name = os.environ.get(NOTIFY_ENV, "")
    if not name or name[0] not in "/@" or _is_worker():
        return False
    message = "\n".join(fields).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # MSG_DONTWAIT: never stall the event loop if systemd is slow to read.
            sock.sendto(message, socket.MSG_DONTWAIT, _address(name))
    except OSError as exc:
        log.warning("could not notify systemd at %s: %s", name, exc)
        return False
    return True


def ready(status: str = "") -> bool:
    """Every listener accepts: `systemctl start` may return. Also after a reload."""
    return notify("READY=1", *([f"STATUS={status}"] if status else []))


def reloading() -> bool:
    """A reload (SIGHUP) has begun; `ready()` ends it."""
    return notify("RELOADING=1")


def stopping() -> bool:
    """Draining before exit (SIGTERM)."""
    return notify("STOPPING=1")


def _is_worker() -> bool:
    from .supervisor import shares_ports
    return shares_ports()
