"""HTTP/1.1 and, later, HTTP/2, SOCKS5 and transparent frontends: thin gevent shells."""
