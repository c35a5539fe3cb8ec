"""The WPAD DNS responder's decisions, sans-I/O: a query's bytes in, what to send back out.

Where it sits: the `dns` listener (`pac/dns_server.py`) reads a UDP datagram or a TCP message and
asks `DnsResponder.respond`. The answer is a `Reply` (bytes to send), a `Forward` (ask the
`[dns] forward` resolvers; the shell sends `Forward.query(id)` and finishes with
`answer_from_upstream` or `servfail`) or `Dropped` (send nothing). Browsers find the PAC file at
`http://wpad.<domain>/wpad.dat`, so `wpad.<domain>` and the appliance's name are answered here,
A and AAAA from `[dns] answer`.

RFCs: 1035 §4.1 (messages), §4.2.1 (512 bytes over UDP, TC), 2181 §9 (TC means "retry over TCP"),
6891 (EDNS0: the client's payload size, one OPT at most, BADVERS), 3225 (the DO bit echoed),
5452 §9.1 (a forwarded answer must match id, server and question), 8906 (forwarders answer
SERVFAIL when every upstream failed), 5358 (no recursion for clients outside the served
networks: they get REFUSED, never larger than their query, so we amplify nothing).

No socket, no gevent, no clock, no randomness: the shell picks upstream query ids. Everything a
hostile packet can make dnslib raise ends here as `Dropped` or an error rcode.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from dnslib import AAAA, CLASS, EDNS0, OPCODE, QTYPE, RR, A, DNSHeader, DNSLabel, DNSQuestion, DNSRecord

from appliance.config import Address, Config, Network, Rule

TTL = 60                 # seconds; clients re-ask soon after an admin changes [dns] answer
UDP_PLAIN = 512          # RFC 1035 §4.2.1: a UDP answer to a query without EDNS
UDP_MAX = 4096           # a client's EDNS payload size is clamped to UDP_PLAIN..UDP_MAX
OUR_PAYLOAD = 1232       # what our OPT records advertise (the DNS flag day 2020 size)
MAX_QUERY = 4096         # a larger query is dropped unparsed: parse cost stays bounded
MAX_MESSAGE = 65535      # RFC 7766: a TCP message's 2-byte length

NOERROR, FORMERR, SERVFAIL, NOTIMP, REFUSED = 0, 1, 2, 4, 5
BADVERS = 16             # RFC 6891 §9: an extended rcode, its upper 8 bits in the OPT record
UPSTREAM_FAILURES = (FORMERR, SERVFAIL, NOTIMP, REFUSED)

OUTSIDER = "client outside every rule's sources"


@dataclass(frozen=True)
class Reply:
    """Bytes to send to the client; `result` is the metric label, `reason` says why if refused."""

    data: bytes
    result: str          # answered | forwarded | refused | truncated | servfail | malformed
    reason: str = ""


@dataclass(frozen=True)
class Dropped:
    """Nothing to send: the packet was no query we could answer (counted as malformed)."""

    reason: str
    result: str = "malformed"


@dataclass(frozen=True, eq=False)
class Forward:
    """Ask `servers` in turn; `query(id)` is the question to send them, with a fresh random id."""

    servers: tuple[Address, ...]
    request: DNSRecord   # the client's query, parsed: never mutated
    opt: RR | None       # the client's OPT record, if it spoke EDNS
    limit: int           # the largest answer the client takes (UDP), or MAX_MESSAGE (TCP)

    @property
    def question(self) -> DNSQuestion:
        return self.request.questions[0]

    def query(self, query_id: int) -> bytes:
        h = self.request.header
        header = DNSHeader(id=query_id, bitmap=0, rd=h.rd, cd=h.cd)
        q = self.question
        record = DNSRecord(header, questions=[DNSQuestion(q.qname, q.qtype, q.qclass)])
        if self.opt is not None:     # EDNS upstream only when the client used it
            record.add_ar(_opt(self.opt.edns_do))
        return bytes(record.pack())


@dataclass(frozen=True)
class UpstreamTruncated:
    """The upstream's UDP answer had TC set: ask the same server over TCP."""


@dataclass(frozen=True)
class UpstreamFailed:
    """The upstream answered, but with a failure: ask the next server."""

    reason: str


class DnsResponder:
    """Answers for one `Config`; build a new one when the config is reloaded."""

    def __init__(self, config: Config) -> None:
        self.forward = config.dns.forward
        self._addresses: dict[int, tuple[str, ...]] = {QTYPE.A: (), QTYPE.AAAA: ()}
        for text in config.dns.answer:
            qtype = QTYPE.A if ipaddress.ip_address(text).version == 4 else QTYPE.AAAA
            self._addresses[qtype] += (text,)
        self._names = frozenset(_key(DNSLabel(name)) for name in our_names(config))
        self._sources = served_sources(config.rules)

    def respond(self, packet: bytes, client_ip: str, udp_limit: int | None) -> Reply | Forward | Dropped:
        """What to do with one query from `client_ip`; `udp_limit` None means it came over TCP."""
        if len(packet) > MAX_QUERY:
            return Dropped(f"query of {len(packet)} bytes, over {MAX_QUERY}")
        request = _parse(packet)
        if request is None:
            return Dropped("not a DNS message")
        if request.header.qr:
            return Dropped("a response, not a query")    # never answer answers: no loops
        opts = [rr for rr in request.ar if rr.rtype == QTYPE.OPT]
        opt = opts[0] if opts else None
        limit = MAX_MESSAGE if udp_limit is None else _udp_limit(opt, udp_limit)
        problem = _malformed(request, opts)
        if problem is not None:
            rcode, reason = problem
            return _error(packet, request, opt, rcode, "malformed", reason)
        if not self._inside(client_ip):
            return _error(packet, request, opt, REFUSED, "refused", OUTSIDER)
        q = request.questions[0]
        if q.qclass != CLASS.IN:
            return _error(packet, request, opt, REFUSED, "refused", "not class IN")
        if _key(q.qname) in self._names:
            return _fit(self._authoritative(request, opt), limit, "answered")
        if q.qtype in (QTYPE.AXFR, QTYPE.IXFR):
            return _error(packet, request, opt, REFUSED, "refused", "zone transfer")
        if self.forward:
            return Forward(self.forward, request, opt, limit)
        return _error(packet, request, opt, REFUSED, "refused", "not our name, and no [dns] forward")

    def _inside(self, client_ip: str) -> bool:
        if self._sources is None:
            return True
        try:
            client = ipaddress.ip_address(client_ip.split("%", 1)[0])
        except ValueError:
            return False
        if client.version == 6 and client.ipv4_mapped:
            client = client.ipv4_mapped
        return any(client.version == net.version and client in net for net in self._sources)

    def _authoritative(self, request: DNSRecord, opt: RR | None) -> DNSRecord:
        """A/AAAA from [dns] answer; any other type of our names: NOERROR with no records."""
        record = _response(request, opt, NOERROR, aa=True, ra=bool(self.forward))
        q = request.questions[0]
        rdata = A if q.qtype == QTYPE.A else AAAA
        for address in self._addresses.get(q.qtype, ()):
            record.add_answer(RR(q.qname, q.qtype, CLASS.IN, TTL, rdata(address)))
        return record


def our_names(config: Config) -> tuple[str, ...]:
    """`wpad.<domain>`, and the appliance's name unless it is an IP literal."""
    names = [f"wpad.{config.dns.domain}"]
    try:
        ipaddress.ip_address(config.appliance.name)
    except ValueError:
        names.append(config.appliance.name)
    return tuple(names)


def served_sources(rules: tuple[Rule, ...]) -> tuple[Network, ...] | None:
    """The networks whose clients we serve: every non-deny rule's `src`; None means everyone.

    Deny rules do not count: a catch-all `action = "deny"` must not open the resolver to the world.
    """
    networks: list[Network] = []
    for rule in rules:
        if rule.action == "deny":
            continue
        if not rule.src:
            return None
        networks.extend(rule.src)
    return tuple(networks)


def answer_from_upstream(forward: Forward, query_id: int,
                         data: bytes) -> Reply | UpstreamTruncated | UpstreamFailed | None:
    """The client's answer from an upstream's, or None when `data` is not the answer we wait for."""
    response = _parse(data)
    if response is None or response.header.id != query_id or not response.header.qr:
        return None
    if response.header.opcode != OPCODE.QUERY:
        return None
    if response.header.tc:
        return UpstreamTruncated()    # a truncated answer may lack the question (dnslib's does)
    if len(response.questions) != 1 or not _same_question(response.questions[0], forward.question):
        return None
    rcode = response.header.rcode
    upstream_opts = [rr for rr in response.ar if rr.rtype == QTYPE.OPT]
    if rcode in UPSTREAM_FAILURES or any(rr.edns_rcode for rr in upstream_opts):
        return UpstreamFailed(f"upstream answered rcode {rcode}")
    header = DNSHeader(id=forward.request.header.id, bitmap=response.header.bitmap, tc=0)
    answer = DNSRecord(header, questions=[forward.question], rr=response.rr, auth=response.auth,
                       ar=[rr for rr in response.ar if rr.rtype != QTYPE.OPT])
    if forward.opt is not None:
        do = any(rr.edns_do for rr in upstream_opts)
        answer.add_ar(_opt(do))
    try:
        return _fit(answer, forward.limit, "forwarded")
    except Exception as error:    # noqa: BLE001 - what dnslib parsed, it may fail to pack again
        return UpstreamFailed(f"cannot pack the upstream's answer: {type(error).__name__}")


def servfail(forward: Forward) -> Reply:
    """Every upstream failed (RFC 8906 §3.1.3.1): tell the client so, with its question."""
    record = _response(forward.request, forward.opt, SERVFAIL, ra=True)
    return _fit(record, forward.limit, "servfail")


# -- helpers ----------------------------------------------------------------------------------


def _parse(data: bytes) -> DNSRecord | None:
    try:
        return DNSRecord.parse(data)
    except Exception:    # noqa: BLE001 - on hostile bytes dnslib raises DNSError, but also
        return None      # struct.error, ValueError, UnicodeError and RecursionError (pointer chains)


def _malformed(request: DNSRecord, opts: list[RR]) -> tuple[int, str] | None:
    if request.header.opcode != OPCODE.QUERY:
        return NOTIMP, f"opcode {request.header.opcode}"
    if len(request.questions) != 1:
        return FORMERR, f"{len(request.questions)} questions"
    if len(opts) > 1:
        return FORMERR, "more than one OPT record"    # RFC 6891 §6.1.1
    if opts and opts[0].edns_ver != 0:
        return BADVERS, f"EDNS version {opts[0].edns_ver}"
    name = request.questions[0].qname
    if len(name) > 253 or any(len(label) > 63 for label in name.label):
        return FORMERR, "question name too long"
    return None


def _udp_limit(opt: RR | None, udp_limit: int) -> int:
    """RFC 6891 §6.2.5: the client's payload size (clamped), or 512 without EDNS."""
    wanted = UDP_PLAIN if opt is None else max(UDP_PLAIN, min(opt.rclass, UDP_MAX))
    return max(UDP_PLAIN, min(wanted, udp_limit))


def _key(name: DNSLabel) -> tuple[bytes, ...]:
    """Names compare case-insensitively (ASCII only, RFC 4343), whatever their trailing dot."""
    return tuple(label.lower() for label in name.label)


def _same_question(a: DNSQuestion, b: DNSQuestion) -> bool:
    return _key(a.qname) == _key(b.qname) and a.qtype == b.qtype and a.qclass == b.qclass


def _opt(do: bool, rcode: int = NOERROR) -> RR:
    return EDNS0(udp_len=OUR_PAYLOAD, ext_rcode=rcode >> 4, flags="do" if do else "")


def _response(request: DNSRecord, opt: RR | None, rcode: int, *, aa: bool = False, ra: bool = False,
              question: bool = True) -> DNSRecord:
    h = request.header
    header = DNSHeader(id=h.id, bitmap=0, qr=1, opcode=h.opcode, aa=int(aa), rd=h.rd, ra=int(ra),
                       cd=h.cd, rcode=rcode & 0xF)
    record = DNSRecord(header, questions=list(request.questions[:1]) if question else [])
    if opt is not None:    # RFC 6891 §7: an OPT in the answer only if the query had one
        record.add_ar(_opt(bool(opt.edns_do), rcode))
    return record


def _error(packet: bytes, request: DNSRecord, opt: RR | None, rcode: int, result: str,
           reason: str) -> Reply | Dropped:
    """An error answer, never larger than the query: nothing to amplify with a forged source."""
    well_formed = rcode not in (FORMERR, NOTIMP)    # else: the header alone, no question, no OPT
    for question in (True, False) if well_formed else (False,):
        try:
            data = bytes(_response(request, opt if well_formed else None, rcode, question=question).pack())
        except Exception:    # noqa: BLE001 - a hostile question dnslib cannot pack again
            continue
        if len(data) <= len(packet):
            return Reply(data, result, reason)
    return Dropped(reason)


def _fit(record: DNSRecord, limit: int, result: str) -> Reply:
    """The packed answer if it fits `limit`; else its question alone with TC set (RFC 2181 §9)."""
    data = bytes(record.pack())
    if len(data) <= limit:
        return Reply(data, result)
    record.rr, record.auth = [], []
    record.ar = [rr for rr in record.ar if rr.rtype == QTYPE.OPT]
    record.header.tc = 1
    return Reply(bytes(record.pack()), "truncated")
