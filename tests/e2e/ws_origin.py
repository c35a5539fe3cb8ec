"""Test WebSocket origin: the `websockets` library's server, echoing every message back.

Run as `python ws_origin.py PORT`. Works with websockets 10.4 (bookworm) and the newest release.
"""

import asyncio
import sys

import websockets


async def echo(websocket, *_path):
    async for message in websocket:
        await websocket.send(message)


async def main(port):
    async with websockets.serve(echo, "127.0.0.1", port, max_size=None):
        await asyncio.Future()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
