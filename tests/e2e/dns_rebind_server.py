"""A hostile nameserver for the destination-policy tests (dnslib, UDP and TCP, loopback only).

Usage: dns_rebind_server.py PORT

Names under `.test` answer with forbidden addresses, or rebind: `rebind-N.test` answers its
first A query with 127.0.0.2 (a stand-in for a harmless public address that stays on loopback)
and every later one with 127.0.0.1, all with TTL 0, as a DNS rebinding attacker's server does.
A TXT query for `queries.<name>` answers how many A queries `<name>` has had, so a test can see
how often the appliance looked a name up.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections import Counter

from dnslib import AAAA, QTYPE, RCODE, RR, TXT, A
from dnslib.server import BaseResolver, DNSLogger, DNSServer

FIXED = {
    "loop4.test.": {"A": ["127.0.0.1"]},
    "loop6.test.": {"AAAA": ["::1"]},
    "metadata.test.": {"A": ["169.254.169.254"]},
    "mapped.test.": {"AAAA": ["::ffff:127.0.0.1"]},
    "unspecified.test.": {"A": ["0.0.0.0"]},
    "multicast.test.": {"A": ["224.0.0.1"]},
    # one harmless-looking address beside a forbidden one: every address must pass
    "mixed.test.": {"A": ["198.51.100.7"], "AAAA": ["::1"]},
}


class HostileResolver(BaseResolver):
    def __init__(self) -> None:
        self.a_queries: Counter[str] = Counter()
        self.lock = threading.Lock()

    def resolve(self, request, handler):
        reply = request.reply()
        name = str(request.q.qname).lower()
        qtype = QTYPE[request.q.qtype]
        if qtype == "TXT" and name.startswith("queries."):
            with self.lock:
                count = self.a_queries[name[len("queries."):]]
            reply.add_answer(RR(request.q.qname, QTYPE.TXT, rdata=TXT(str(count)), ttl=0))
            return reply
        if qtype == "A":
            with self.lock:
                self.a_queries[name] += 1
                seen = self.a_queries[name]
        if name.startswith("rebind-") and name.endswith(".test."):
            if qtype == "A":
                address = "127.0.0.2" if seen == 1 else "127.0.0.1"
                reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(address), ttl=0))
            return reply
        answers = FIXED.get(name)
        if answers is None:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        for address in answers.get(qtype, ()):
            # dnslib's own IPv6 parser knows no embedded IPv4 (::ffff:127.0.0.1): give it bytes
            rdata = A(address) if qtype == "A" else AAAA(list(socket.inet_pton(socket.AF_INET6, address)))
            reply.add_answer(RR(request.q.qname, getattr(QTYPE, qtype), rdata=rdata, ttl=0))
        return reply


def main() -> None:
    port = int(sys.argv[1])
    resolver = HostileResolver()
    quiet = DNSLogger(log="-request,-reply,-truncated,-error", prefix=False)
    servers = [DNSServer(resolver, port=port, address="127.0.0.1", tcp=tcp, logger=quiet)
               for tcp in (False, True)]
    for server in servers:
        server.start_thread()
    while all(server.isAlive() for server in servers):      # until the test stops us by PID
        time.sleep(0.5)


if __name__ == "__main__":
    main()
