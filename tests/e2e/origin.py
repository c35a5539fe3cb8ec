"""Test origin: a gevent.pywsgi WSGI server (a real HTTP/1.1 server) with endpoints the e2e tests use.

Run as `python origin.py PORT [HOST [CERT KEY]]` (with CERT and KEY it speaks TLS). Endpoints:
  /echo           JSON: method, path, query, headers, body length and sha256, the peer's port
  /bytes?n=N      N zero bytes, with Content-Length, or chunked when &chunked=1
  /slow?s=S       sleeps S seconds, then 200
  /status?code=N  an empty answer with that status
  /seen           JSON list of every request (method, path?query) received so far; /echo
                  requests are listed only once their whole body has arrived
Anything else: 404.
"""

import hashlib
import json
import sys
from urllib.parse import parse_qs

from gevent import monkey

monkey.patch_all()

import gevent  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402

SEEN = []
ZEROS = b"\0" * (1 << 20)


def _body_digest(environ):
    h = hashlib.sha256()
    n = 0
    stream = environ["wsgi.input"]
    while True:
        data = stream.read(1 << 18)
        if not data:
            break
        h.update(data)
        n += len(data)
    return n, h.hexdigest()


def _zeros(n):
    while n > 0:
        piece = ZEROS[:min(n, len(ZEROS))]
        n -= len(piece)
        yield piece


def app(environ, start_response):
    path = environ["PATH_INFO"]
    query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    query_string = environ.get("QUERY_STRING", "")
    line = f"{environ['REQUEST_METHOD']} {path}" + (f"?{query_string}" if query_string else "")
    if path == "/echo":
        length, digest = _body_digest(environ)
        SEEN.append(line)                 # only once the whole body has arrived
        headers = [[k[5:].replace("_", "-").title(), v] for k, v in environ.items() if k.startswith("HTTP_")]
        for key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            if environ.get(key):
                headers.append([key.replace("_", "-").title(), environ[key]])
        body = json.dumps({"method": environ["REQUEST_METHOD"], "path": path, "query": query,
                           "headers": headers, "body_length": length, "body_sha256": digest,
                           "peer_port": int(environ["REMOTE_PORT"])}).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]
    SEEN.append(line)
    if path == "/bytes":
        n = int(query.get("n", "0"))
        headers = [("Content-Type", "application/octet-stream")]
        if query.get("chunked") != "1":
            headers.append(("Content-Length", str(n)))
        start_response("200 OK", headers)
        return [] if environ["REQUEST_METHOD"] == "HEAD" else _zeros(n)
    if path == "/slow":
        gevent.sleep(float(query.get("s", "3")))
        start_response("200 OK", [("Content-Length", "5")])
        return [b"slow\n"]
    if path == "/status":
        start_response(f"{int(query.get('code', '200'))} Whatever", [("Content-Length", "0")])
        return [b""]
    if path == "/seen":
        body = json.dumps(SEEN).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]
    start_response("404 Not Found", [("Content-Length", "10")])
    return [b"not found\n"]


if __name__ == "__main__":
    port = int(sys.argv[1])
    host = sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1"
    tls = {"certfile": sys.argv[3], "keyfile": sys.argv[4]} if len(sys.argv) > 4 else {}
    WSGIServer((host, port), app, log=None, **tls).serve_forever()
