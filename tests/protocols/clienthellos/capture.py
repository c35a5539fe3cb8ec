"""Capture the ClientHellos real TLS clients send, as hex fixtures for the SNI parser's tests.

Run by hand, never by the tests (they only read the `*.hex` files this writes beside it):

    .venv/bin/python tests/protocols/clienthellos/capture.py            # every client
    .venv/bin/python tests/protocols/clienthellos/capture.py curl node  # only these

For each client it listens on 127.0.0.1 on a free port, starts the client against it, reads from
the first connection until `appliance.protocols.tls_clienthello.read_client_hello` says a whole
ClientHello is in, closes the connection (the client then fails its handshake, as it should) and
stops the client by its PID. The bytes are written as `NAME.hex`: `#` comment lines naming the
client's version and command, then the hex, 32 bytes a line. Only loopback is used; every wait is
bounded. If the parser refuses a hello, the bytes read so far are still written and the error is
printed, so the fixture shows the bug.

Clients (www.example.test is mapped to 127.0.0.1 by each client, never looked up):
  curl           curl https://www.example.test:PORT/ --resolve www.example.test:PORT:127.0.0.1 -k
                 (ALPN h2,http/1.1 is curl's default)
  curl-no-sni    curl -k https://127.0.0.1:PORT/  (an IP literal: no server_name)
  openssl        openssl s_client -connect 127.0.0.1:PORT -servername www.example.test
                 -alpn h2,http/1.1
  openssl-tls12  the same with -no_tls1_3: no supported_versions extension
  chromium       headless Chromium with every flag of tests/e2e/chromium/flags.txt
                 (GREASE, ECH GREASE, an X25519MLKEM768 key share: a hello over 1500 bytes)
  python         this interpreter's ssl over a real socket, ALPN http/1.1 as urllib3 sends it
  node           tls.connect with servername and ALPNProtocols h2,http/1.1

Chromium: the flags file is written for the binary Debian's /usr/bin/chromium launcher execs
(/usr/lib/chromium/chromium), so that binary is run when it is there, as tests/e2e does. Chromium
keeps only the last of a repeated switch, so the flags file's `--host-resolver-rules` is merged
with the `MAP www.example.test 127.0.0.1` rule (first, since the first matching MAP wins) and its
`--headless` is replaced by `--headless=new`.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

from tests.e2e.chromium_browser import stop_chromium  # noqa: E402
from appliance.protocols.tls_clienthello import (  # noqa: E402
    ClientHello,
    MalformedHello,
    NotTls,
    read_client_hello,
)

HOST = "www.example.test"
CHROMIUM_FLAGS = HERE.parents[1] / "e2e" / "chromium" / "flags.txt"   # the project's copy
ACCEPT_TIMEOUT = 30.0       # Chromium takes a few seconds to start
READ_TIMEOUT = 10.0
READ_LIMIT = 65536


def curl(port: int, tmp: Path) -> list[str]:
    return ["curl", f"https://{HOST}:{port}/", "--resolve", f"{HOST}:{port}:127.0.0.1", "-k",
            "--max-time", "10"]


def curl_no_sni(port: int, tmp: Path) -> list[str]:
    return ["curl", "-k", f"https://127.0.0.1:{port}/", "--max-time", "10"]


def openssl(port: int, tmp: Path) -> list[str]:
    return ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", HOST,
            "-alpn", "h2,http/1.1"]


def openssl_tls12(port: int, tmp: Path) -> list[str]:
    return [*openssl(port, tmp), "-no_tls1_3"]


def chromium_binary() -> str:
    binary = Path("/usr/lib/chromium/chromium")
    return str(binary) if os.access(binary, os.X_OK) else "/usr/bin/chromium"


def chromium(port: int, tmp: Path) -> list[str]:
    flags = []
    for line in CHROMIUM_FLAGS.read_text().splitlines():
        flag = line.strip()
        if not flag or flag.startswith("#"):
            continue
        if flag == "--headless":
            flag = "--headless=new"
        elif flag.startswith("--host-resolver-rules="):
            flag = f"--host-resolver-rules=MAP {HOST} 127.0.0.1 , " + flag.split("=", 1)[1]
        flags.append(flag)
    return [chromium_binary(), *flags, "--disable-dev-shm-usage",
            f"--user-data-dir={tmp / 'profile'}", f"https://{HOST}:{port}/"]


PYTHON_CLIENT = """
import socket, ssl, sys
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
ctx.set_alpn_protocols(["http/1.1"])
with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10) as raw:
    try:
        ctx.wrap_socket(raw, server_hostname="www.example.test")
    except (OSError, ssl.SSLError):
        pass
"""


def python(port: int, tmp: Path) -> list[str]:
    return [sys.executable, "-c", PYTHON_CLIENT, str(port)]


NODE_CLIENT = """
const tls = require("tls");
const s = tls.connect({host: "127.0.0.1", port: Number(process.argv[1]),
  servername: "www.example.test", ALPNProtocols: ["h2", "http/1.1"],
  rejectUnauthorized: false});
s.on("error", () => process.exit(0));
s.on("close", () => process.exit(0));
setTimeout(() => process.exit(0), 10000);
"""


def node(port: int, tmp: Path) -> list[str]:
    return ["node", "-e", NODE_CLIENT, str(port)]


def python_version() -> str:
    import ssl
    return f"Python {sys.version.split()[0]} ({ssl.OPENSSL_VERSION})"


def tool_version(argv: list[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)
    return (done.stdout or done.stderr).strip().splitlines()[0]


# name: (command builder, how to ask its version)
CLIENTS = {
    "curl": (curl, lambda: tool_version(["curl", "--version"])),
    "curl-no-sni": (curl_no_sni, lambda: tool_version(["curl", "--version"])),
    "openssl": (openssl, lambda: tool_version(["openssl", "version"])),
    "openssl-tls12": (openssl_tls12, lambda: tool_version(["openssl", "version"])),
    "chromium": (chromium, lambda: tool_version([chromium_binary(), "--version"])),
    "python": (python, python_version),
    "node": (node, lambda: "Node " + tool_version(["node", "--version"])),
}


def start(argv: list[str], tmp: Path) -> subprocess.Popen:
    env = {**os.environ, "HOME": str(tmp), "XDG_CONFIG_HOME": str(tmp / ".config"),
           "XDG_CACHE_HOME": str(tmp / ".cache")}
    env.pop("DISPLAY", None)
    # A session of its own: the process group id is the child's PID, so helpers it forks
    # (Chromium's zygote, renderer, network service) are ended with it and nothing else is.
    with open(tmp / "client.log", "wb") as log:
        return subprocess.Popen(argv, env=env, cwd=tmp, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


def read_hello(conn: socket.socket) -> tuple[bytes, str | None]:
    """The bytes read until a whole ClientHello is in; and the parser's complaint, if any."""
    data = b""
    deadline = time.monotonic() + READ_TIMEOUT
    while len(data) < READ_LIMIT:
        try:
            if isinstance(read_client_hello(data), ClientHello):
                return data, None
        except (NotTls, MalformedHello) as exc:
            return data, f"{type(exc).__name__}: {exc}"
        conn.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = conn.recv(65536)
        except TimeoutError:
            return data, "timed out before a whole ClientHello"
        if not chunk:
            return data, "the client closed before a whole ClientHello"
        data += chunk
    return data, f"no whole ClientHello in {READ_LIMIT} bytes"


def capture(name: str) -> bytes:
    build, version = CLIENTS[name]
    with tempfile.TemporaryDirectory(prefix=f"hello-{name}-") as tmp_name, \
            socket.create_server(("127.0.0.1", 0)) as server:
        tmp = Path(tmp_name)
        port = server.getsockname()[1]
        argv = build(port, tmp)
        proc = start(argv, tmp)
        try:
            server.settimeout(ACCEPT_TIMEOUT)
            conn, _ = server.accept()
            with conn:
                data, problem = read_hello(conn)
        except TimeoutError:
            log = (tmp / "client.log").read_text(errors="replace")[-2000:]
            raise SystemExit(f"{name}: no connection in {ACCEPT_TIMEOUT} s; client said:\n{log}")
        finally:
            stop_chromium(proc)   # by PID, then its process group
    if problem:
        print(f"{name}: {problem} (after {len(data)} bytes)", file=sys.stderr)
    shown = ["<script in capture.py>" if "\n" in a else a if " " not in a else repr(a)
             for a in argv]
    header = [f"# {name}: {version()}", "# command: " + " ".join(shown),
              f"# {len(data)} bytes" + (f"; parser: {problem}" if problem else "")]
    hexed = data.hex()
    lines = [hexed[i:i + 64] for i in range(0, len(hexed), 64)]
    (HERE / f"{name}.hex").write_text("\n".join(header + lines) + "\n")
    return data


def main(names: list[str]) -> int:
    for name in names or list(CLIENTS):
        if name not in CLIENTS:
            print(f"unknown client {name!r}; one of {', '.join(CLIENTS)}", file=sys.stderr)
            return 2
        tool = CLIENTS[name][0](0, Path("."))[0]
        if shutil.which(tool) is None and not os.access(tool, os.X_OK):
            print(f"{name}: {tool} is not installed; skipped", file=sys.stderr)
            continue
        data = capture(name)
        try:
            hello = read_client_hello(data)
        except (NotTls, MalformedHello) as exc:
            hello = exc
        print(f"{name}: {len(data)} bytes -> {hello}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
