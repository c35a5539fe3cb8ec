"""`pac.dns_answer`: the WPAD DNS responder's decisions, bytes in and bytes out.

RFC 1035 §4.1 (messages) and §4.2.1 (512 bytes, TC), RFC 6891 (EDNS0 payload size, BADVERS),
RFC 5452 (a forwarded answer must match its id and question), RFC 5358 (no recursion for outsiders).
Queries are built with dnslib; the shell (`pac.dns_server`) is tested in tests/e2e/test_dns_responder.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

import json

import pytest
from dnslib import CLASS, EDNS0, QTYPE, RR, A, DNSHeader, DNSQuestion, DNSRecord

from appliance.config import Address, Config, parse
from pac import dns_answer
from pac.dns_answer import (BADVERS, FORMERR, NOTIMP, OUTSIDER, REFUSED, SERVFAIL, DnsResponder,
                            Dropped, Forward, Reply, UpstreamFailed, UpstreamTruncated,
                            answer_from_upstream, served_sources, servfail)

FORWARDERS = ("127.0.0.1:5300", "[::1]:5301")
LOOPBACK_ONLY = '[[rule]]\nname = "loopback"\naction = "allow"\nsrc = ["127.0.0.0/8", "::1"]\n'
MANY = tuple(f"127.0.1.{i}" for i in range(1, 61))    # 60 answers: about 1000 bytes packed


def make_config(answer=("127.0.0.1", "::1"), forward=(), name="proxy.test", domain="localdomain",
                rules=LOOPBACK_ONLY) -> Config:
    return parse(f'[appliance]\nname = {json.dumps(name)}\n'
                 f'[dns]\ndomain = {json.dumps(domain)}\nanswer = {json.dumps(list(answer))}\n'
                 f'forward = {json.dumps(list(forward))}\n{rules}')


def query(name: str, qtype: str = "A", *, edns: int | None = None, do: bool = False,
          qid: int = 4321, rd: int = 1) -> bytes:
    record = DNSRecord(DNSHeader(id=qid, rd=rd), q=DNSQuestion(name, getattr(QTYPE, qtype)))
    if edns is not None:
        record.add_ar(EDNS0(udp_len=edns, flags="do" if do else ""))
    return bytes(record.pack())


def upstream_answer(upstream_query: bytes, *addresses: str, rcode: int = 0, tc: int = 0,
                    qid: int | None = None) -> bytes:
    """What a resolver would send back for `upstream_query`."""
    request = DNSRecord.parse(upstream_query)
    header = DNSHeader(id=request.header.id if qid is None else qid, bitmap=request.header.bitmap,
                       qr=1, ra=1, rcode=rcode, tc=tc)
    answer = DNSRecord(header, questions=[] if tc else list(request.questions))
    for address in addresses:
        answer.add_answer(RR(request.q.qname, QTYPE.A, ttl=300, rdata=A(address)))
    answer.ar = [rr for rr in request.ar if rr.rtype == QTYPE.OPT]
    return bytes(answer.pack())


def answer(responder: DnsResponder, packet: bytes, client: str = "127.0.0.1",
           udp_limit: int | None = 4096) -> tuple[Reply, DNSRecord]:
    reply = responder.respond(packet, client, udp_limit)
    assert isinstance(reply, Reply), reply
    return reply, DNSRecord.parse(reply.data)


def addresses(record: DNSRecord) -> list[str]:
    return [str(rr.rdata) for rr in record.rr]


# -- our names ----------------------------------------------------------------------------------


def test_wpad_name_gets_a_and_aaaa_by_family():
    responder = DnsResponder(make_config())
    reply, record = answer(responder, query("wpad.localdomain", "A", qid=777))
    assert reply.result == "answered"
    assert record.header.id == 777 and record.header.qr and record.header.aa
    assert record.header.rcode == 0 and not record.header.tc
    assert addresses(record) == ["127.0.0.1"]
    assert [rr.ttl for rr in record.rr] == [dns_answer.TTL] and dns_answer.TTL <= 300
    _, record = answer(responder, query("wpad.localdomain", "AAAA"))
    assert addresses(record) == ["::1"] and record.rr[0].rtype == QTYPE.AAAA


@pytest.mark.parametrize("name", ["wpad.localdomain", "WPAD.LocalDomain", "wpad.localdomain.",
                                  "proxy.test", "Proxy.TEST."])
def test_our_names_ignore_case_and_trailing_dot(name):
    reply, record = answer(DnsResponder(make_config()), query(name))
    assert reply.result == "answered" and addresses(record) == ["127.0.0.1"]
    assert str(record.q.qname).rstrip(".") == name.rstrip(".")     # the question as asked


def test_other_types_of_our_names_are_noerror_without_records():
    responder = DnsResponder(make_config(answer=("192.0.2.7",)))
    for qtype in ("AAAA", "MX", "TXT", "ANY"):
        reply, record = answer(responder, query("wpad.localdomain", qtype))
        assert reply.result == "answered" and record.header.rcode == 0 and record.rr == []


def test_several_answers_in_config_order():
    responder = DnsResponder(make_config(answer=("192.0.2.1", "2001:db8::1", "192.0.2.2")))
    assert addresses(answer(responder, query("proxy.test"))[1]) == ["192.0.2.1", "192.0.2.2"]
    assert addresses(answer(responder, query("proxy.test", "AAAA"))[1]) == ["2001:db8::1"]


def test_an_ip_literal_appliance_name_is_no_name_of_ours():
    responder = DnsResponder(make_config(name="192.0.2.1"))
    reply, record = answer(responder, query("192.0.2.1"))
    assert reply.result == "refused" and record.header.rcode == REFUSED


def test_names_below_our_domain_other_than_wpad_are_not_ours():
    reply, _ = answer(DnsResponder(make_config()), query("www.localdomain"))
    assert reply.result == "refused"


def test_answer_over_edns_carries_an_opt_record_and_echoes_do():
    _, record = answer(DnsResponder(make_config()), query("wpad.localdomain", edns=1232, do=True))
    (opt,) = record.ar
    assert opt.rtype == QTYPE.OPT and opt.edns_do and opt.rclass == dns_answer.OUR_PAYLOAD


# -- outsiders and other names --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["wpad.localdomain", "example.com"])
@pytest.mark.parametrize("edns", [None, 4096])
def test_clients_outside_the_rules_get_refused_never_larger_than_their_query(name, edns):
    responder = DnsResponder(make_config(forward=FORWARDERS))
    packet = query(name, edns=edns)
    reply, record = answer(responder, packet, client="192.0.2.99")
    assert reply.result == "refused" and reply.reason == OUTSIDER
    assert record.header.rcode == REFUSED and record.rr == [] and not record.header.aa
    assert len(reply.data) <= len(packet)


def test_ipv6_outsider_refused_and_ipv4_mapped_insider_served():
    responder = DnsResponder(make_config(forward=FORWARDERS))
    assert answer(responder, query("example.com"), client="2001:db8::5")[0].reason == OUTSIDER
    assert answer(responder, query("proxy.test"), client="::ffff:127.0.0.1")[0].result == "answered"
    assert answer(responder, query("proxy.test"), client="::1")[0].result == "answered"


def test_only_allowing_rules_open_the_responder():
    catch_all_deny = make_config().rules + make_config(rules='[[rule]]\naction = "deny"\n').rules
    assert served_sources(catch_all_deny) == served_sources(make_config().rules)
    assert served_sources(make_config(rules='[[rule]]\naction = "allow"\n').rules) is None
    assert served_sources(make_config(rules="").rules) == ()
    everyone = DnsResponder(make_config(rules='[[rule]]\naction = "passthrough"\n'))
    assert answer(everyone, query("proxy.test"), client="198.51.100.1")[0].result == "answered"


def test_other_names_refused_without_forwarders():
    packet = query("example.com", edns=1232)
    reply, record = answer(DnsResponder(make_config()), packet)
    assert reply.result == "refused" and record.header.rcode == REFUSED
    assert record.q.qname == "example.com" and len(reply.data) <= len(packet)


@pytest.mark.parametrize("edns", [None, 1400])
def test_other_names_forwarded_with_a_fresh_query(edns):
    forward = DnsResponder(make_config(forward=FORWARDERS)).respond(
        query("Example.COM", "AAAA", edns=edns, qid=99, rd=1), "127.0.0.1", 4096)
    assert isinstance(forward, Forward)
    assert forward.servers == (Address("127.0.0.1", 5300), Address("::1", 5301))
    upstream = DNSRecord.parse(forward.query(0xBEEF))
    assert upstream.header.id == 0xBEEF and not upstream.header.qr and upstream.header.rd
    assert str(upstream.q.qname) == "Example.COM." and upstream.q.qtype == QTYPE.AAAA
    opts = [rr for rr in upstream.ar if rr.rtype == QTYPE.OPT]
    assert len(opts) == (0 if edns is None else 1)     # EDNS upstream only if the client used it


def test_zone_transfers_and_other_classes_are_refused_not_forwarded():
    responder = DnsResponder(make_config(forward=FORWARDERS))
    assert answer(responder, query("example.com", "AXFR"))[0].result == "refused"
    chaos = DNSRecord(DNSHeader(id=1), q=DNSQuestion("version.bind", QTYPE.TXT, CLASS.CH))
    assert answer(responder, bytes(chaos.pack()))[0].result == "refused"


# -- forwarded answers ----------------------------------------------------------------------------


def forwarded(name="example.com", edns=None, qid=4321, udp_limit: int | None = 4096) -> Forward:
    outcome = DnsResponder(make_config(forward=FORWARDERS)).respond(
        query(name, edns=edns, qid=qid), "127.0.0.1", udp_limit)
    assert isinstance(outcome, Forward)
    return outcome


def test_upstream_answer_goes_back_with_the_clients_id():
    forward = forwarded(qid=4321)
    reply = answer_from_upstream(forward, 777, upstream_answer(forward.query(777), "192.0.2.5"))
    assert isinstance(reply, Reply) and reply.result == "forwarded"
    record = DNSRecord.parse(reply.data)
    assert record.header.id == 4321 and addresses(record) == ["192.0.2.5"]


def test_upstream_datagrams_that_are_not_the_answer_are_ignored():
    forward = forwarded()
    upstream_query = forward.query(777)
    assert answer_from_upstream(forward, 777, upstream_answer(upstream_query, "192.0.2.5", qid=778)) is None
    assert answer_from_upstream(forward, 777, upstream_query) is None                # not a response
    other = query("other.example", qid=777)
    assert answer_from_upstream(forward, 777, upstream_answer(other, "192.0.2.6")) is None
    assert answer_from_upstream(forward, 777, b"\x03\x09garbage") is None


def test_upstream_truncation_and_failures_are_told_apart():
    forward = forwarded()
    upstream_query = forward.query(5)
    assert isinstance(answer_from_upstream(forward, 5, upstream_answer(upstream_query, tc=1)),
                      UpstreamTruncated)
    for rcode in (SERVFAIL, REFUSED):
        failed = answer_from_upstream(forward, 5, upstream_answer(upstream_query, rcode=rcode))
        assert isinstance(failed, UpstreamFailed)
    nxdomain = answer_from_upstream(forward, 5, upstream_answer(upstream_query, rcode=3))
    assert isinstance(nxdomain, Reply) and DNSRecord.parse(nxdomain.data).header.rcode == 3


def test_upstream_opt_is_dropped_for_a_client_without_edns():
    forward = forwarded(edns=None)
    upstream = DNSRecord.parse(upstream_answer(forward.query(5), "192.0.2.5"))
    upstream.add_ar(EDNS0(udp_len=4096))
    reply = answer_from_upstream(forward, 5, bytes(upstream.pack()))
    assert DNSRecord.parse(reply.data).ar == []


def test_large_upstream_answer_is_truncated_to_the_clients_size():
    many = [f"192.0.2.{i}" for i in range(1, 101)]
    for edns, limit in ((None, 512), (700, 700)):
        forward = forwarded(edns=edns)
        reply = answer_from_upstream(forward, 9, upstream_answer(forward.query(9), *many))
        record = DNSRecord.parse(reply.data)
        assert reply.result == "truncated" and len(reply.data) <= limit
        assert record.header.tc and record.rr == [] and record.header.id == 4321
    tcp = forwarded(udp_limit=None)
    reply = answer_from_upstream(tcp, 9, upstream_answer(tcp.query(9), *many))
    assert reply.result == "forwarded" and len(DNSRecord.parse(reply.data).rr) == 100


def test_servfail_when_every_upstream_failed():
    reply = servfail(forwarded(qid=31, edns=1232))
    record = DNSRecord.parse(reply.data)
    assert reply.result == "servfail" and record.header.rcode == SERVFAIL and record.header.id == 31
    assert record.q.qname == "example.com" and len(record.ar) == 1


# -- truncation of our own answers ----------------------------------------------------------------


@pytest.mark.parametrize("edns, limit", [(None, 512), (600, 600), (100, 512), (9000, 4096)])
def test_udp_answer_larger_than_the_client_takes_is_truncated(edns, limit):
    responder = DnsResponder(make_config(answer=MANY))
    packet = query("wpad.localdomain", edns=edns)
    full = answer(responder, packet, udp_limit=None)[0]
    assert len(full.data) > 900
    reply, record = answer(responder, packet, udp_limit=4096)
    assert len(reply.data) <= limit
    if len(full.data) <= limit:
        assert reply.result == "answered" and len(record.rr) == 60
    else:
        assert reply.result == "truncated" and record.header.tc and record.rr == []
        assert record.q.qname == "wpad.localdomain"      # the question stays, so dig retries it


def test_tcp_answer_is_never_truncated_and_transport_limit_caps_edns():
    responder = DnsResponder(make_config(answer=MANY))
    reply, record = answer(responder, query("wpad.localdomain"), udp_limit=None)
    assert reply.result == "answered" and len(record.rr) == 60 and not record.header.tc
    reply, _ = answer(responder, query("wpad.localdomain", edns=4096), udp_limit=700)
    assert reply.result == "truncated" and len(reply.data) <= 700


# -- malformed queries ----------------------------------------------------------------------------


def raw_query(qd: int = 1, bitmap: int = 0x0100, body: bytes = b"") -> bytes:
    return (0x1234).to_bytes(2, "big") + bitmap.to_bytes(2, "big") + qd.to_bytes(2, "big") + bytes(6) + body


QUESTION = b"\x04wpad\x0blocaldomain\x00\x00\x01\x00\x01"


@pytest.mark.parametrize("packet", [b"", b"\x00", b"\x12\x34\x01\x00\x00\x01", b"\xff" * 40,
                                    raw_query(body=b"\x04wpad"),                 # question cut short
                                    raw_query(body=b"\xc0\x0c\x00\x01\x00\x01"),  # pointer to itself
                                    raw_query(bitmap=0x8100, body=QUESTION),     # a response
                                    query("wpad.localdomain") + bytes(dns_answer.MAX_QUERY)])
def test_garbage_responses_and_oversized_packets_are_dropped(packet):
    assert isinstance(DnsResponder(make_config()).respond(packet, "127.0.0.1", 4096), Dropped)


@pytest.mark.parametrize("packet, rcode", [
    (raw_query(qd=0), FORMERR),
    (raw_query(qd=2, body=QUESTION * 2), FORMERR),
    (raw_query(body=b"\x40" + b"a" * 64 + b"\x00\x00\x01\x00\x01"), FORMERR),   # a 64-byte label
    (raw_query(bitmap=0x2000 | 0x0100, body=QUESTION), NOTIMP),               # opcode 4, NOTIFY
    (raw_query(bitmap=0x2800, body=QUESTION), NOTIMP),                        # opcode 5, UPDATE
    (raw_query(bitmap=0x1000, body=QUESTION), NOTIMP),                        # opcode 2, STATUS
])
def test_malformed_queries_get_a_header_only_error(packet, rcode):
    reply, record = answer(DnsResponder(make_config()), packet)
    assert reply.result == "malformed" and record.header.rcode == rcode and record.header.qr
    assert record.header.id == 0x1234 and len(reply.data) == 12


def test_edns_version_1_gets_badvers_and_two_opts_formerr():
    responder = DnsResponder(make_config())
    record = DNSRecord(DNSHeader(id=5), q=DNSQuestion("wpad.localdomain"))
    record.add_ar(EDNS0(udp_len=1232, version=1))
    reply, answered = answer(responder, bytes(record.pack()))
    (opt,) = answered.ar
    assert reply.result == "malformed" and (opt.edns_rcode << 4 | answered.header.rcode) == BADVERS
    record = DNSRecord(DNSHeader(id=5), q=DNSQuestion("wpad.localdomain"))
    record.add_ar(EDNS0(udp_len=1232), EDNS0(udp_len=1232))
    reply, answered = answer(responder, bytes(record.pack()))
    assert answered.header.rcode == FORMERR


# -- the core stays sans-I/O (DESIGN.md) -----------------------------------------------------------


def test_dns_answer_imports_no_io_clock_or_randomness():
    # dnslib itself imports socket (for its client helpers), so look at our module's own imports.
    tree = ast.parse(Path(dns_answer.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & {"gevent", "socket", "ssl", "time", "random", "secrets", "select", "asyncio"}
    assert imported <= {"__future__", "ipaddress", "dataclasses", "dnslib", "appliance"}
