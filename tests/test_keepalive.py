"""A vanished device is found by TCP keep-alive (Herald sends no WebSocket pings: each one made
objects per connection that the cyclic GC had to walk, docs/performance.md): every connection
the server accepts, a live stream's included, has the kernel's keep-alive timer running. Read
from /proc/net/tcp, where an idle socket with SO_KEEPALIVE shows timer 2 (keep-alive) and one
without shows 0."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.conftest import RegisteredApp, Server
from tests.devices import api, open_stream, subscription_body

KEEPALIVE_TIMER = 2


def server_sockets(port: int) -> list[int]:
    """The timer kind of each established socket whose local end is `port` (IPv4)."""
    timers = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state, timer = fields[1], fields[3], fields[5]
        if int(local.split(":")[1], 16) == port and state == "01":
            timers.append(int(timer.split(":")[0], 16))
    return timers


async def test_streams_have_tcp_keepalive(server: Server, app: RegisteredApp) -> None:
    port = int(server.base_url.rsplit(":", 1)[1])
    token = server.token(app, "keepalive-user")
    async with api(server.base_url, token) as a:
        r = await a.post(
            "/beta/me/notificationSubscriptions", json=subscription_body(app.host_name)
        )
        assert r.status_code == 201, r.text
        sub = r.json()["id"]
        async with (
            open_stream("ws", server.base_url, sub, token) as ws,
            open_stream("sse", server.base_url, sub, token) as sse,
        ):
            await ws.ready()
            await sse.ready()
            await asyncio.sleep(0.2)  # idle: no retransmission timer in the way
            timers = server_sockets(port)
            assert len(timers) >= 3, timers  # the API client's, the WebSocket, the SSE stream
            assert all(t == KEEPALIVE_TIMER for t in timers), timers
