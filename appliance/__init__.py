"""Forward-proxy appliance: explicit HTTP/1.1 and HTTP/2 proxy, WebSocket, SOCKS5, transparent interception."""

__version__ = "0.1.0"
