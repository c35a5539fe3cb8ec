"""A TLS handshake between the stdlib `ssl` module's client and server, in memory (no sockets):
what a certificate from `certs` must survive before a real client sees it.
"""

from __future__ import annotations

import ssl

import pytest


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, hostname: str):
    """Run a TLS handshake between two SSLObjects over MemoryBIOs; return (client, server)."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=hostname)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = set()
    for _ in range(10):  # TLS 1.3 needs 2 round trips, 1.2 needs 3
        for side in (client, server):
            if side not in done:
                try:
                    side.do_handshake()
                    done.add(side)
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if len(done) == 2:
            break
    else:
        pytest.fail("handshake did not finish")
    client.write(b"ping")
    s_in.write(c_out.read())
    assert server.read(4) == b"ping"
    return client, server


def server_context(files) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*files)
    return context


def client_context(cafile) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(cafile))
    context.verify_flags |= ssl.VERIFY_X509_STRICT  # Python 3.13's default; be ready for it
    assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
    return context
