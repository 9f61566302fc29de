"""herald/websocket.py in process, on a transport that records what is written: what sending a
message leaves behind for the cyclic garbage collector."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

from uvicorn.config import Config
from uvicorn.server import ServerState

from herald.websocket import WebSocket

HANDSHAKE = (
    b"GET /stream HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
)


class Transport(asyncio.Transport):
    """Keeps what the server writes."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 8000)}.get(
            name, default
        )


async def test_a_message_sent_adds_nothing_to_a_frozen_connection_for_the_collector() -> None:
    """Herald freezes the objects of its open connections, so that collections do not walk them
    (herald/collector.py). Sending a message must not replace a container of the connection's
    protocol state with a new one: the new one is young, and with thousands of streams each
    sending, thousands of them (the websockets library's output list, swapped for a new one on
    every `data_to_send`) made each young-generation collection take 2-5 ms under load."""
    go, sent = asyncio.Event(), asyncio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        closed = asyncio.create_task(receive())  # as a live stream waits for the client's close
        for _ in range(2):
            await go.wait()
            go.clear()
            await send({"type": "websocket.send", "text": "a change"})
            sent.set()
        await closed

    config = Config(app=app, lifespan="off", log_level="warning")
    ws = WebSocket(config, ServerState(), {})
    transport = Transport()
    ws.connection_made(transport)
    ws.data_received(HANDSHAKE)
    await asyncio.sleep(0.05)
    assert transport.written.startswith(b"HTTP/1.1 101")

    go.set()  # a first message: whatever the first send sets up once
    await asyncio.wait_for(sent.wait(), 5)
    sent.clear()
    before = len(transport.written)
    gc.collect()
    gc.freeze()  # as the collector does with an open connection's objects
    try:
        go.set()
        await asyncio.wait_for(sent.wait(), 5)
        assert len(transport.written) > before  # the message went out
        young = {id(o) for o in gc.get_objects(generation=0)}
        state = [ws, ws.protocol, *gc.get_referents(ws), *gc.get_referents(ws.protocol)]
        renewed = [type(o).__name__ for o in state if gc.is_tracked(o) and id(o) in young]
    finally:
        gc.unfreeze()
        ws.connection_lost(None)
        await asyncio.sleep(0)
    assert renewed == [], f"sending a message replaced {renewed} of the connection's state"
