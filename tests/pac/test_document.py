"""`pac.document`: MIME type, ETag, Last-Modified and 304 (RFC 9110 §13, §15.4.5)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from pac.document import PAC_MIME, PacDocument

NOW = datetime(2026, 11, 29, 12, 0, 0, 250000, tzinfo=timezone.utc)


def test_full_answer_with_validators():
    doc = PacDocument.build("function FindProxyForURL(u, h) { return \"DIRECT\"; }\n", NOW)
    status, mime, body, headers = doc.respond(())
    assert (status, mime) == (200, PAC_MIME) and body == doc.body
    fields = dict(headers)
    assert fields["ETag"] == doc.etag and fields["ETag"].startswith('"')
    assert fields["Last-Modified"] == "Sun, 29 Nov 2026 12:00:00 GMT"
    assert fields["Cache-Control"] == "max-age=300"


def test_if_none_match_gives_304_without_body():
    doc = PacDocument.build("x", NOW)
    assert doc.respond((("If-None-Match", doc.etag),))[:3] == (304, PAC_MIME, b"")
    assert doc.respond((("If-None-Match", f'"other", W/{doc.etag}'),))[0] == 304
    assert doc.respond((("If-None-Match", "*"),))[0] == 304
    assert doc.respond((("If-None-Match", '"other"'),))[0] == 200


def test_if_modified_since():
    doc = PacDocument.build("x", NOW)
    assert doc.respond((("If-Modified-Since", "Sun, 29 Nov 2026 12:00:00 GMT"),))[0] == 304
    assert doc.respond((("If-Modified-Since", "Sun, 29 Nov 2026 11:59:59 GMT"),))[0] == 200
    assert doc.respond((("If-Modified-Since", "not a date"),))[0] == 200


def test_if_none_match_wins_over_if_modified_since():
    doc = PacDocument.build("x", NOW)
    headers = (("If-None-Match", '"other"'), ("If-Modified-Since", "Sun, 29 Nov 2026 13:00:00 GMT"))
    assert doc.respond(headers)[0] == 200


def test_unchanged_content_keeps_its_validators_across_rebuilds():
    first = PacDocument.build("same", NOW)
    assert PacDocument.build("same", NOW + timedelta(hours=1), first) is first
    changed = PacDocument.build("changed", NOW + timedelta(hours=1), first)
    assert changed.etag != first.etag and changed.last_modified > first.last_modified
