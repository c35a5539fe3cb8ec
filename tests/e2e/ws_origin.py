"""Test WebSocket origin: the `websockets` library's server, echoing every message back.

Run as `python ws_origin.py PORT [CERT KEY]` (with CERT and KEY: wss://); it listens on
127.0.0.1, or on the address in the environment variable WS_ORIGIN_HOST. Works with websockets 10.4 (bookworm) and the newest release.
"""

import asyncio
import os
import ssl
import sys

import websockets


async def echo(websocket, *_path):
    async for message in websocket:
        await websocket.send(message)


async def main(port, tls):
    host = os.environ.get("WS_ORIGIN_HOST", "127.0.0.1")
    async with websockets.serve(echo, host, port, max_size=None, ssl=tls):
        await asyncio.Future()


if __name__ == "__main__":
    context = None
    if len(sys.argv) > 3:                    # CERT KEY: wss://
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(sys.argv[2], sys.argv[3])
    asyncio.run(main(int(sys.argv[1]), context))
