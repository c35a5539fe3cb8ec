"""The pac listener hands out the appliance CA, so clients can trust intercepted TLS."""

from __future__ import annotations

import urllib.request

from cryptography import x509

from .conftest import free_port


def get(url: str) -> tuple[int, str, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as r:
        return r.status, r.headers["Content-Type"], r.read()


def test_ca_pem_and_der_with_their_mime_types(make_appliance):
    port = free_port()
    app = make_appliance(more_listeners=f'pac = "127.0.0.1:{port}"')
    status, mime, pem = get(f"http://127.0.0.1:{port}/ca.pem")
    assert status == 200 and mime == "application/x-pem-file"
    assert pem == app.ca_path.read_bytes()
    status, mime, der = get(f"http://127.0.0.1:{port}/ca.der")
    assert status == 200 and mime == "application/x-x509-ca-cert"
    assert x509.load_der_x509_certificate(der) == x509.load_pem_x509_certificate(pem)
    assert x509.load_pem_x509_certificate(pem).subject.rfc4514_string() == "CN=Appliance CA"
