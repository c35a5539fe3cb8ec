"""`pac.dns_answer` under hostile bytes: nothing raises, nothing amplifies.

Whatever arrives (random bytes, real queries with bytes flipped, cut or inserted, and the same for
the upstream's answers), `respond` returns a Reply, a Forward or Dropped; an answer over UDP fits
the client's size; a client outside the rules gets nothing larger than it sent and is never
forwarded (RFC 5358).
"""

from __future__ import annotations

from dnslib import DNSRecord
from hypothesis import given
from hypothesis import strategies as st

from pac.dns_answer import (MAX_MESSAGE, OUTSIDER, DnsResponder, Dropped, Forward, Reply,
                            UpstreamFailed, UpstreamTruncated, answer_from_upstream, servfail)

from .test_dns_answer import FORWARDERS, MANY, make_config, query, upstream_answer

RESPONDERS = [DnsResponder(make_config()), DnsResponder(make_config(forward=FORWARDERS)),
              DnsResponder(make_config(answer=MANY, forward=FORWARDERS))]
INSIDERS = ["127.0.0.1", "::1", "::ffff:127.0.0.9"]
OUTSIDERS = ["192.0.2.9", "2001:db8::9", "fe80::1%lo", "not an address"]

clients = st.sampled_from(INSIDERS + OUTSIDERS)
udp_limits = st.sampled_from([None, 512, 1232, 4096])
responders = st.sampled_from(RESPONDERS)
labels = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-",
                 min_size=1, max_size=20)
names = st.one_of(st.sampled_from(["wpad.localdomain", "WPAD.localdomain.", "proxy.test"]),
                  st.lists(labels, min_size=1, max_size=5).map(".".join))
qtypes = st.sampled_from(["A", "AAAA", "MX", "TXT", "ANY", "AXFR", "PTR", "SOA"])
edns_sizes = st.one_of(st.none(), st.integers(min_value=0, max_value=65535))


@st.composite
def real_queries(draw) -> bytes:
    return query(draw(names), draw(qtypes), edns=draw(edns_sizes), do=draw(st.booleans()),
                 qid=draw(st.integers(0, 0xFFFF)), rd=draw(st.integers(0, 1)))


@st.composite
def mutated(draw, messages) -> bytes:
    """A real message with bytes flipped, inserted or cut off: mostly parseable, often wrong."""
    data = bytearray(draw(messages))
    for _ in range(draw(st.integers(1, 6))):
        action = draw(st.sampled_from(["flip", "insert", "cut"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if action == "flip" and data:
            data[at] = draw(st.integers(0, 255))
        elif action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[at:]
    return bytes(data)


def check(responder: DnsResponder, packet: bytes, client: str, udp_limit: int | None):
    outcome = responder.respond(packet, client, udp_limit)
    assert isinstance(outcome, (Reply, Forward, Dropped))
    outsider = client in OUTSIDERS
    if isinstance(outcome, Reply):
        DNSRecord.parse(outcome.data)                     # we only ever send DNS messages
        assert len(outcome.data) <= (udp_limit or MAX_MESSAGE)
        if outsider:
            assert len(outcome.data) <= len(packet)
            assert outcome.result == "malformed" or outcome.reason == OUTSIDER
    if isinstance(outcome, Forward):
        assert not outsider and responder.forward
        assert isinstance(servfail(outcome), Reply)
        DNSRecord.parse(outcome.query(0x1234))
    return outcome


@given(st.binary(max_size=600), responders, clients, udp_limits)
def test_arbitrary_bytes_never_raise(packet, responder, client, udp_limit):
    check(responder, packet, client, udp_limit)


@given(mutated(real_queries()), responders, clients, udp_limits)
def test_mutated_queries_never_raise_nor_amplify(packet, responder, client, udp_limit):
    check(responder, packet, client, udp_limit)


@given(real_queries(), responders, clients, udp_limits)
def test_real_queries_fit_the_clients_size(packet, responder, client, udp_limit):
    outcome = check(responder, packet, client, udp_limit)
    assert not isinstance(outcome, Dropped)


@st.composite
def upstream_datagrams(draw, forward: Forward, query_id: int) -> bytes:
    real = upstream_answer(forward.query(query_id), *draw(st.lists(
        st.sampled_from(["192.0.2.1", "192.0.2.2", "198.51.100.7"]), max_size=80)))
    return draw(st.one_of(st.just(real), mutated(st.just(real)), st.binary(max_size=300)))


@given(real_queries(), udp_limits, st.data())
def test_upstream_answers_never_raise_and_fit_the_client(packet, udp_limit, data):
    forward = RESPONDERS[1].respond(packet, "127.0.0.1", udp_limit)
    if not isinstance(forward, Forward):
        return
    outcome = answer_from_upstream(forward, 0x4242, data.draw(upstream_datagrams(forward, 0x4242)))
    assert outcome is None or isinstance(outcome, (Reply, UpstreamTruncated, UpstreamFailed))
    if isinstance(outcome, Reply):
        record = DNSRecord.parse(outcome.data)
        assert record.header.id == DNSRecord.parse(packet).header.id
        assert len(outcome.data) <= forward.limit
