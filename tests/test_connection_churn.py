"""Connection churn does not leak: a real `herald serve` takes 50,000 live WebSocket streams,
opened and closed in waves, and its memory (RSS) does not grow with churn: after the warm-up
waves, what the server holds while a wave is open does not climb from wave to wave (the median
step, at most 3 % of the warm-up level), and neither the waves nor the idle level after
the last one sit more than 25 % above what the server held during the warm-up (why not the idle
level between waves, nor a tighter level: see the test). Herald keeps long-lived connection state
frozen out of the cyclic collector's reach (herald/collector.py); a closed connection's reference
cycles are only freed when that is undone, which this catches if it never happens.

The devices are raw sockets (a WebSocket handshake written by hand, the `ready` frame read, then
the socket closed), so the client side stays cheap enough for 50,000 connections in seconds."""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import resource
import statistics
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest

from herald.auth.issuer import LocalIssuer
from tests.conftest import free_port
from tests.devices import subscription_body
from tests.processes import register, start

HOST = "churn.example.com"
WAVES = 10  # in all, of PER_WAVE connections each
WARM_UP = 4  # waves before the level the test holds to (the allocator's plateau: see the test)
PER_WAVE = 5_000
USERS = 5  # each with one subscription, streamed PER_WAVE / USERS times at once
IN_FLIGHT = 256  # handshakes at a time
TOLERANCE = 0.25  # above the warm-up level, for the later waves' median and the level after
GROWTH = 0.03  # of the warm-up level, per wave: the most the later waves may climb
SETTLE_S = 15.0  # how long RSS may take to come back (the collector looks once a second)
THAW_S = 3.0  # the collector unfreezes a tick after closing pauses, and looks once a second


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def handshake(port: int, sub: str, token: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET /beta/me/notificationSubscriptions/{sub}/stream HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"Authorization: Bearer {token}\r\n\r\n"
    ).encode()


async def open_one(port: int, request: bytes, gate: asyncio.Semaphore) -> asyncio.StreamWriter:
    """A WebSocket stream, open once its `ready` message came."""
    async with gate:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head[:200]
        first = await reader.readexactly(2)  # an unmasked text frame, short: `ready`
        assert first[0] == 0x81 and first[1] < 126, first
        assert b'"ready"' in await reader.readexactly(first[1])
        return writer


async def wave(port: int, requests: list[bytes], pid: int) -> int:
    """Open a stream per request, then drop them all; the server's RSS while all were open."""
    gate = asyncio.Semaphore(IN_FLIGHT)
    writers = await asyncio.gather(*(open_one(port, r, gate) for r in requests))
    held = rss_kb(pid)
    for writer in writers:
        writer.transport.abort()  # the device vanishes: no close handshake
    return held


def streams_open(base: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("herald_live_streams{")
    )


def settle(proc: subprocess.Popen[bytes], base: str, level: int | None) -> int:
    """RSS once no stream is open and (given a level) it is back within the tolerance of it, or
    when time runs out."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        now = rss_kb(proc.pid)
        if streams_open(base) == 0 and (level is None or now <= level * (1 + TOLERANCE)):
            return now
        if time.monotonic() > deadline:
            return now
        time.sleep(0.25)


@pytest.mark.timeout(180)  # 45-60 s on the 2-core machine: 50,000 handshakes
def test_rss_returns_after_50000_connections_in_waves(tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard >= PER_WAVE + 100, f"open-files hard limit {hard} is below one wave"
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    client_id = register(tmp_path, None, HOST)
    issuer = LocalIssuer.load_or_create(tmp_path, "urn:herald:local", "api://herald")
    tokens = [
        issuer.mint(client_id=client_id, user_id=f"churn-{uuid.uuid4()}") for _ in range(USERS)
    ]
    per_sub = str(PER_WAVE // USERS)
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
        rss0 = rss_kb(proc.pid)
        requests = [handshake(port, subs[i % USERS], tokens[i % USERS]) for i in range(PER_WAVE)]
        # The level before: once the server has held WARM_UP waves. Freed memory is not all given
        # back to the system (Python's allocator keeps a 1 MiB arena while any object in it
        # lives, the C heap keeps fragments), so the first waves raise RSS for good even on a
        # server that frees every object of every connection (measured: 75 MB idle, then 188,
        # 199, 215, 215 MB while waves 1-4 are held, and 26.2 MB of live Python objects before
        # and 26.3 after, sys._debugmallocstats); a leak raises it with every wave after that
        # (never unfreezing: +20 MB a wave, 213 MB before, then 427 MB).
        # How much of a closed wave's memory goes back to the system between waves varies from
        # run to run (182-200 MB after three waves, measured), so that idle level is no bound:
        # comparing with it failed 2 runs in 3 on a server that does not leak. What a wave held
        # during the warm-up reaches a plateau by the fourth (measured: 188, 199, 215, 215 MB
        # for waves 1-4; then 198-225 MB for each later wave); a leak adds to it every wave
        # (never unfreezing: 264 MB held in the warm-up, then 285, 314, 333, 355, 384, 409).
        held = max(asyncio.run(wave(port, requests, proc.pid)) for _ in range(WARM_UP))
        settle(proc, base, None)
        time.sleep(THAW_S)
        between = rss_kb(proc.pid)
        later = [asyncio.run(wave(port, requests, proc.pid)) for _ in range(WAVES - WARM_UP)]
        # A leak is growth from wave to wave, so that is what the test measures: the median of the
        # steps from each later wave to the next, which one or two steps of the allocator do not
        # move. Such steps happen after the warm-up on a server that does not leak (measured:
        # 204 MB held in the warm-up, then 198, 225, 225, 225, 225, 225 MB, where a bound of
        # +10 % on the waves' median failed; 223, then 202, 202, 214, 214, 216, 216 MB), while a
        # leak climbs every wave (never unfreezing: +19-29 MB a wave, 7-11 % of 264 MB).
        growth = statistics.median(b - a for a, b in itertools.pairwise(later))
        peak = statistics.median(later)
        after = settle(proc, base, held)
        print(
            f"RSS: {rss0} KB idle, {held} KB holding a warm-up wave, {between} KB between, "
            f"{later} KB holding the later waves (growth {growth:.0f} KB a wave), {after} KB after"
        )
        # What a leak of these connections would add is a fair share of what they hold.
        assert held > 1.5 * rss0, "a wave does not hold enough memory to tell a leak"
        assert growth <= GROWTH * held, (held, later, growth)
        assert peak <= held * (1 + TOLERANCE), (held, later, after)
        assert after <= held * (1 + TOLERANCE), (held, later, after)
    finally:
        proc.terminate()
        proc.wait(10)
