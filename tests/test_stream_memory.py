"""An idle live WebSocket stream costs a real `herald serve` at most 20 KB of memory (RSS), so a
process holds tens of thousands of devices (issue 15; benchmarks/stream_memory.py measures the
candidates side by side). The devices are raw sockets (handshake written by hand, `ready` read)
that then stay open and send nothing."""

from __future__ import annotations

import asyncio
import resource
import time
import uuid
from pathlib import Path

import httpx
import pytest

from herald.auth.issuer import LocalIssuer
from tests.conftest import free_port
from tests.devices import subscription_body
from tests.processes import register, start
from tests.test_connection_churn import handshake, open_one, rss_kb

HOST = "memory.example.com"
STREAMS = 3_000
USERS = 30  # each with one subscription, streamed STREAMS / USERS times at once
IN_FLIGHT = 128
MAX_KB_PER_STREAM = 20.0  # issue 15's target (uvicorn's websockets-sansio: 24 KB)
SETTLE_S = 2.0  # the collector freezes new streams once a second


async def hold(port: int, requests: list[bytes], pid: int) -> tuple[int, int]:
    """Open every stream, wait, read RSS, drop them: (streams opened, RSS while held)."""
    gate = asyncio.Semaphore(IN_FLIGHT)
    writers = await asyncio.gather(*(open_one(port, r, gate) for r in requests))
    await asyncio.sleep(SETTLE_S)
    held = rss_kb(pid)
    for writer in writers:
        writer.transport.abort()
    return len(writers), held


@pytest.mark.timeout(120)
def test_an_idle_live_stream_costs_at_most_20_kb(tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard >= STREAMS + 100, f"open-files hard limit {hard} is below {STREAMS} streams"
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    client_id = register(tmp_path, None, HOST)
    issuer = LocalIssuer.load_or_create(tmp_path, "urn:herald:local", "api://herald")
    tokens = [issuer.mint(client_id=client_id, user_id=f"mem-{uuid.uuid4()}") for _ in range(USERS)]
    per_sub = str(STREAMS // USERS)
    proc = start(
        tmp_path,
        port,
        None,
        HERALD_MAX_STREAMS_PER_SUBSCRIPTION=per_sub,
        HERALD_MAX_STREAMS_PER_USER=per_sub,
        HERALD_MAX_PENDING_PER_ADDRESS=str(4 * IN_FLIGHT),
        HERALD_LOG_LEVEL="warning",  # not a line per connection
    )
    try:
        subs = []
        for token in tokens:
            r = httpx.post(
                f"{base}/beta/me/notificationSubscriptions",
                json=subscription_body(HOST, "live"),
                headers={"Authorization": f"Bearer {token}"},
            )
            assert r.status_code == 201, r.text
            subs.append(r.json()["id"])
        requests = [handshake(port, subs[i % USERS], tokens[i % USERS]) for i in range(STREAMS)]
        asyncio.run(hold(port, requests[:USERS], proc.pid))  # one-time costs paid first
        time.sleep(SETTLE_S)
        before = rss_kb(proc.pid)
        opened, held = asyncio.run(hold(port, requests, proc.pid))
        per_stream = (held - before) / opened
        print(f"RSS {before} KB idle, {held} KB with {opened} streams: {per_stream:.1f} KB each")
        assert opened == STREAMS
        assert per_stream <= MAX_KB_PER_STREAM, (before, held, per_stream)
    finally:
        proc.terminate()
        proc.wait(10)
