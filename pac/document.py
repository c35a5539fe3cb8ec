"""The PAC file as the pac listener serves it: MIME type, validators, and conditional answers.

Browsers re-fetch the PAC file on every network change, and WPAD clients give up after about a
second, so the answer is computed once per config and a revalidation is a bodiless 304
(RFC 9110 §13: If-None-Match wins over If-Modified-Since). The ETag is a hash of the content,
so every worker serves the same one; Last-Modified is when this content was first rendered.

Sans-I/O: bytes and header tuples in, a reply out; `now` is passed in.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timezone

from appliance.protocols.http1 import Headers, header_value

PAC_MIME = "application/x-ns-proxy-autoconfig"
MAX_AGE = 300          # seconds browsers may reuse it without asking (a reload shows in 5 min)

Reply = tuple[int, str, bytes, Headers]
HTTP_DATE = "%a, %d %b %Y %H:%M:%S GMT"    # IMF-fixdate (RFC 9110 §5.6.7); email.utils would
                                           # import socket into this sans-I/O module


@dataclass(frozen=True)
class PacDocument:
    body: bytes
    etag: str                  # strong validator, quoted
    last_modified: datetime    # UTC, whole seconds

    @classmethod
    def build(cls, text: str, now: datetime, previous: PacDocument | None = None) -> PacDocument:
        """The document for `text`; the previous one is kept when the content did not change."""
        body = text.encode("utf-8")
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        if previous is not None and previous.etag == etag:
            return previous
        return cls(body, etag, now.astimezone(timezone.utc).replace(microsecond=0))

    def respond(self, request_headers: Headers) -> Reply:
        validators = (("ETag", self.etag),
                      ("Last-Modified", self.last_modified.strftime(HTTP_DATE)),
                      ("Cache-Control", f"max-age={MAX_AGE}"))
        if self._not_modified(request_headers):
            return 304, PAC_MIME, b"", validators
        return 200, PAC_MIME, self.body, validators

    def _not_modified(self, headers: Headers) -> bool:
        match = header_value(headers, "if-none-match")
        if match is not None:
            tags = {tag.strip().removeprefix("W/") for tag in match.split(",")}
            return "*" in tags or self.etag in tags
        since = header_value(headers, "if-modified-since")
        if since is None:
            return False
        try:   # clients send back the date we gave them: IMF-fixdate
            when = datetime.strptime(since.strip(), HTTP_DATE).replace(tzinfo=timezone.utc)
        except ValueError:
            return False                   # an invalid date is ignored (RFC 9110 §13.1.3)
        return self.last_modified <= when
