"""On-the-fly CA: create/load the CA, mint and cache leaf certificates.

`certs.authority` holds the CA (`CertificateAuthority`, `CAError`); `certs.leaf` writes the https
listener's certificate files (`issue_files`) and caches leaves in memory (`LeafCertCache`);
`certs.store` keeps leaves for interception in memory and on disk, shared by workers (`LeafStore`).
Imports `appliance.config` at most, never the frontends; no sockets, no gevent.
"""

from certs.authority import KEY_TYPES, CAError, CertificateAuthority
from certs.leaf import LeafCertCache, issue_files
from certs.store import LeafStore

__all__ = ["KEY_TYPES", "CAError", "CertificateAuthority", "LeafCertCache", "LeafStore",
           "issue_files"]
