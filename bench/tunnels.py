"""Tunnels beyond one stream: N parallel CONNECT downloads, and many idle CONNECT tunnels.

- `parallel_download`: N tunnels through the proxy's CONNECT to the bulk server, each
  downloading nbytes / N at once (one thread each; recv_into releases the GIL); aggregate
  MB/s from the moment every tunnel is open until the last byte, CPU-s per GB of the proxy.
- `idle_cost`: open N CONNECT tunnels to a sink (a process of its own that accepts and holds
  connections without reading), measure the proxy's process-tree RSS before and after, and
  divide by the tunnels that opened. Bounded in time; a proxy that refuses or stalls is
  reported with how many tunnels it held.

Loopback only; every socket is closed before returning.
"""
from __future__ import annotations

import os
import selectors
import socket
import sys
import threading
import time
from pathlib import Path

from children import HOST, MiB, Child, tree_cpu_seconds, wait_until
from load import listening, open_tunnel

KiB = 1024
STALL_SECONDS = 10.0   # idle tunnels: give up when no CONNECT was answered for this long


# -- N parallel CONNECT downloads -------------------------------------------------------------

def parallel_download(proxy_port: int | None, bulk_port: int, nbytes: int, streams: int,
                      deadline: float, pid: int | None) -> dict:
    """streams tunnels download nbytes // streams each at once; aggregate MB/s."""
    per = nbytes // streams
    socks: list[socket.socket] = []
    try:
        for _ in range(streams):
            socks.append(open_tunnel(proxy_port, bulk_port, timeout=10.0))
        moved = [0] * streams
        end = time.monotonic() + deadline

        def pull(i: int) -> None:
            view = memoryview(bytearray(MiB))
            s = socks[i]
            try:
                s.sendall(f"GET {per}\n".encode())
                while moved[i] < per and time.monotonic() < end:
                    k = s.recv_into(view, min(MiB, per - moved[i]))
                    if not k:
                        break
                    moved[i] += k
            except OSError:
                pass

        threads = [threading.Thread(target=pull, args=(i,), daemon=True) for i in range(streams)]
        cpu0 = tree_cpu_seconds(pid) if pid else None
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(0.1, end - time.monotonic() + 5))
        elapsed = time.perf_counter() - t0
        cpu1 = tree_cpu_seconds(pid) if pid else None
    except OSError as exc:
        return {"ok": False, "error": str(exc), "streams": streams}
    finally:
        for s in socks:
            s.close()
    total = sum(moved)
    result = {"ok": total == per * streams, "streams": streams, "bytes": total,
              "seconds": round(elapsed, 3),
              "mb_per_s": round(total / elapsed / 1e6, 1) if elapsed > 0 else 0.0}
    if cpu0 is not None and total:
        result["cpu_s"] = round(cpu1 - cpu0, 3)
        result["cpu_s_per_gb"] = round((cpu1 - cpu0) / (total / 1e9), 3)
    if not result["ok"]:
        result["error"] = f"moved {total} of {per * streams} bytes (deadline {deadline:.0f}s)"
    return result


# -- idle tunnels ----------------------------------------------------------------------------

def tree_pids(root_pid: int) -> list[int]:
    """root_pid and its live descendants."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                raw = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(raw[raw.rfind(")") + 2:].split()[1])
    members, frontier = [root_pid], [root_pid]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in members:
                members.append(pid)
                frontier.append(pid)
    return members


def tree_memory_kib(root_pid: int) -> dict:
    """VmRSS summed over the process tree, Pss (shared pages split) from smaps_rollup, and
    the open file descriptors of the tree."""
    rss = pss = 0
    n = 0
    for pid in tree_pids(root_pid):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1])
                    n += 1
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except OSError:
            continue
    fds = 0
    for pid in tree_pids(root_pid):
        try:
            fds += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            continue
    return {"rss_kib": rss, "pss_kib": pss, "processes": n, "fds": fds}


def serve_sink(port: int) -> None:
    """The sink (its own process: `python tunnels.py PORT`): accept and hold every
    connection, sending nothing; close one when its peer closes (so that it holds only
    what is open)."""
    import resource
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((HOST, port))
    listener.listen(4096)
    listener.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            if key.fileobj is listener:
                try:
                    conn, _ = listener.accept()
                except OSError:   # out of fds, or a reset: try again later
                    time.sleep(0.01)
                    continue
                conn.setblocking(False)
                sel.register(conn, selectors.EVENT_READ)
            else:
                try:
                    data = key.fileobj.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(key.fileobj)
                    key.fileobj.close()


def start_sink(work: Path, port: int, python: str) -> Child:
    child = Child("sink", [python, str(Path(__file__).resolve()), str(port)], work)
    wait_until(lambda: listening(port), 10.0, child, "idle sink")
    return child


def open_idle_tunnels(proxy_port: int, sink_port: int, count: int, deadline: float,
                      batch: int = 200) -> tuple[list[socket.socket], str]:
    """Open up to count CONNECT tunnels, batch at a time in flight; (sockets, why it stopped)."""
    opened: list[socket.socket] = []
    end = time.monotonic() + deadline
    request = f"CONNECT {HOST}:{sink_port} HTTP/1.1\r\nHost: {HOST}:{sink_port}\r\n\r\n".encode()
    sel = selectors.DefaultSelector()
    try:
        while len(opened) < count:
            if time.monotonic() > end:
                return opened, f"deadline {deadline:.0f}s"
            pending: dict[socket.socket, bytes] = {}
            for _ in range(min(batch, count - len(opened))):
                try:
                    s = socket.create_connection((HOST, proxy_port), timeout=10.0)
                    s.sendall(request)
                except OSError as exc:
                    for p in pending:
                        p.close()
                    return opened, f"connect: {exc}"
                s.setblocking(False)
                pending[s] = b""
                sel.register(s, selectors.EVENT_READ)
            progress = time.monotonic()
            while pending and time.monotonic() < end:
                if time.monotonic() - progress > STALL_SECONDS:
                    break
                for key, _ in sel.select(timeout=1.0):
                    progress = time.monotonic()
                    s = key.fileobj
                    try:
                        data = s.recv(4096)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    head = pending[s] + data
                    if not data or b"\r\n\r\n" in head:
                        sel.unregister(s)
                        del pending[s]
                        status = head.split(b"\r\n", 1)[0]
                        if not data or b" 200" not in status:
                            s.close()
                            for p in pending:
                                sel.unregister(p)
                                p.close()
                            return opened, f"refused: {status.decode(errors='replace')!r}"
                        opened.append(s)
                    else:
                        pending[s] = head
            if pending:
                for p in pending:
                    sel.unregister(p)
                    p.close()
                why = (f"deadline {deadline:.0f}s" if time.monotonic() >= end else
                       f"stalled: {len(pending)} CONNECTs unanswered for {STALL_SECONDS:.0f}s")
                return opened, why
        return opened, ""
    finally:
        sel.close()


def idle_cost(pid: int, proxy_port: int, sink_port: int, count: int, deadline: float,
              settle: float = 2.0) -> dict:
    """RSS per idle tunnel: the proxy's tree RSS with none open (after a few warm-up
    tunnels), then with count open and idle for settle seconds; (after - before) / opened.
    Run it on a freshly started proxy, so that memory freed by earlier tunnels is not
    reused and counted as free."""
    warm, _ = open_idle_tunnels(proxy_port, sink_port, 20, 10.0)
    for s in warm:
        s.close()
    time.sleep(settle)
    before = tree_memory_kib(pid)
    t0 = time.monotonic()
    socks, why = open_idle_tunnels(proxy_port, sink_port, count, deadline)
    open_s = time.monotonic() - t0
    time.sleep(settle)
    after = tree_memory_kib(pid)
    held = len(socks)
    alive = 0   # still open? a proxy may have closed some meanwhile: probe without blocking
    for s in socks:
        try:
            alive += s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
        except BlockingIOError:
            alive += 1
        except OSError:
            pass
    entry = {"requested": count, "opened": held, "alive_after_settle": alive,
             "open_seconds": round(open_s, 1),
             "rss_before_kib": before["rss_kib"], "rss_after_kib": after["rss_kib"],
             "pss_before_kib": before["pss_kib"], "pss_after_kib": after["pss_kib"],
             "fds_before": before["fds"], "fds_after": after["fds"],
             "processes": after["processes"], "ok": held == count and alive == count}
    if held:
        entry["rss_kib_per_tunnel"] = round((after["rss_kib"] - before["rss_kib"]) / held, 2)
        entry["pss_kib_per_tunnel"] = round((after["pss_kib"] - before["pss_kib"]) / held, 2)
        entry["fds_per_tunnel"] = round((after["fds"] - before["fds"]) / held, 2)
    if why or alive < held:
        entry["error"] = why or f"{held - alive} tunnels closed by the proxy while idle"
    for s in socks:
        s.close()
    print(f"  idle {count}: opened {held} in {open_s:.1f} s, alive {alive}"
          + (f", {entry['rss_kib_per_tunnel']} KiB RSS/tunnel" if held else "")
          + (f"  [{entry['error']}]" if "error" in entry else ""))
    return entry


if __name__ == "__main__":
    serve_sink(int(sys.argv[1]))
