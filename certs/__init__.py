"""On-the-fly CA: create/load the CA, mint and cache leaf certificates.

`certs.authority` holds the CA (`CertificateAuthority`, `CAError`); `certs.leaf` writes the https
listener's certificate files (`issue_files`) and caches leaves for interception (`LeafCertCache`).
Imports `appliance.config` at most, never the frontends; no sockets, no gevent.
"""

from certs.authority import CAError, CertificateAuthority
from certs.leaf import LeafCertCache, issue_files

__all__ = ["CAError", "CertificateAuthority", "LeafCertCache", "issue_files"]
