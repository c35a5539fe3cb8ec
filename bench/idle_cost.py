#!/usr/bin/env python3
"""What an idle tunnel's bytes are: RSS of the parts a gevent proxy holds per idle connection.

The idle suite of `bench/run` measures the appliance's RSS per idle CONNECT tunnel; this
measures, in a bare gevent process with the same Python and gevent, the two parts an idle
tunnel is made of, so the table can say what each byte is:

- a connected socket pair as gevent socket objects (per socket, with its io watchers);
- a greenlet blocked in a socket read (its Python data stack and saved C stack).

Usage: bench/idle_cost.py [--count N]   (runs under the interpreter given, e.g.
`PYTHON=/usr/bin/python3`: `$PYTHON bench/idle_cost.py`). Prints one JSON line.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import sys

import gevent
from gevent import socket


def rss_kib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024


def blocked_read(depth: int, sock: socket.socket) -> bytes:
    """A read `depth` Python calls down, as the relay's reader sits under the session's frames."""
    return sock.recv(1) if depth == 0 else blocked_read(depth - 1, sock)


def settle() -> None:
    gevent.sleep(0.2)
    gc.collect()


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=4000, help="socket pairs and greenlets (default 4000)")
    ap.add_argument("--depth", type=int, default=12, help="Python frames above each blocked read")
    a = ap.parse_args(argv)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    count = min(a.count, (hard - 64) // 2)
    settle()
    base = rss_kib()
    pairs = [socket.socketpair() for _ in range(count)]
    settle()
    with_sockets = rss_kib()
    readers = [gevent.spawn(blocked_read, a.depth, left) for left, _ in pairs]
    settle()
    with_greenlets = rss_kib()
    print(json.dumps({
        "python": platform.python_version(), "gevent": gevent.__version__, "count": count,
        "socket_kib": round((with_sockets - base) / (2 * count), 2),
        "blocked_greenlet_kib": round((with_greenlets - with_sockets) / count, 2),
    }))
    gevent.killall(readers)
    for left, right in pairs:
        left.close()
        right.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
