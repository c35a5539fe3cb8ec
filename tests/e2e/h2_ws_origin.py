"""Test origin speaking HTTP/2 with RFC 8441 WebSocket: Hypercorn (a real ASGI server) with an
echo app. Cleartext; HTTP/2 by prior knowledge. Run as `python h2_ws_origin.py PORT`.

A WebSocket to /deny is refused (403). A text message "version" is answered with the HTTP
version the WebSocket came over ("2" for extended CONNECT); anything else is echoed.
"""

import asyncio
import sys

from hypercorn.asyncio import serve
from hypercorn.config import Config


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    if scope["type"] == "http":
        body = scope["http_version"].encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
        return
    await receive()                                   # websocket.connect
    if scope["path"] == "/deny":
        await send({"type": "websocket.close", "code": 1008})
        return
    offered = scope.get("subprotocols") or []
    await send({"type": "websocket.accept", "subprotocol": offered[0] if offered else None})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        if message.get("text") == "version":
            await send({"type": "websocket.send", "text": scope["http_version"]})
        elif message.get("text") is not None:
            await send({"type": "websocket.send", "text": message["text"]})
        else:
            await send({"type": "websocket.send", "bytes": message["bytes"]})


if __name__ == "__main__":
    config = Config()
    config.bind = [f"127.0.0.1:{int(sys.argv[1])}"]
    config.accesslog = None
    asyncio.run(serve(app, config))
