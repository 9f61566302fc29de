"""Live delivery survives a crash: two devices of one user stream from a real `herald serve`,
which is SIGKILLed right after it acknowledged a burst of posts; after a restart on the same data
the devices resume from their last positions and every acknowledged notification has reached
every device exactly once (a repeat only with the position of its first delivery, which the
client drops). Also: a graceful shutdown closes streams with `closing`/`shutdown`."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from herald.auth.issuer import LocalIssuer
from tests.conftest import free_port
from tests.devices import WAIT, Stream, api, open_stream, subscription_body
from tests.processes import register, start

HOST = "crash-devices.example.com"
FEED = "/beta/me/notifications"
ACKED_BEFORE_KILL = 200
POSTS = 1200


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


@dataclass
class Device:
    protocol: str
    subscription: str
    last: int = 0
    # Every change message received, per connection: (position, id, type).
    sessions: list[list[tuple[int, str, str]]] = field(default_factory=list)
    connected: asyncio.Event = field(default_factory=asyncio.Event)  # set once `ready` came

    def received(self) -> list[tuple[int, str, str]]:
        return [m for s in self.sessions for m in s]

    def ids(self) -> set[str]:
        return {id for _, id, _ in self.received()}


async def listen(
    device: Device, base: str, token: str, *, resume: bool, notify: Callable[[], None] | None = None
) -> None:
    """Stream into `device` until the stream ends, remembering positions; call `notify` after
    each change message."""
    kw: dict[str, Any] = {}
    if resume:
        kw = {"after": device.last} if device.protocol == "ws" else {"last_event_id": device.last}
    session: list[tuple[int, str, str]] = []
    device.sessions.append(session)
    async with open_stream(device.protocol, base, device.subscription, token, **kw) as s:
        ready = await s.ready()
        if resume:
            assert ready == device.last, (device.protocol, ready, device.last)
        device.last = ready if not resume else device.last
        device.connected.set()
        await consume(device, s, session, notify)


async def consume(
    device: Device,
    s: Stream,
    session: list[tuple[int, str, str]],
    notify: Callable[[], None] | None,
) -> None:
    while True:
        kind, value = await s.queue.get()
        if kind == "end":
            return
        if kind != "message":
            continue
        assert value["type"] in ("created", "updated", "deleted", "expired"), value
        session.append((value["position"], value["id"], value["type"]))
        device.last = max(device.last, value["position"])
        if notify is not None:
            notify()


async def burst(base: str, token: str, proc: subprocess.Popen[bytes]) -> dict[str, str]:
    """Post until the server is killed; return the acknowledged (appNotificationId -> id)."""
    acked: dict[str, str] = {}
    numbers = iter(range(POSTS))

    async def worker(client: httpx.AsyncClient) -> None:
        for i in numbers:
            body = {
                "targetHostName": HOST,
                "appNotificationId": f"n{i}",
                "payload": {"rawContent": f"message {i}"},
            }
            try:
                r = await client.post("/beta/me/notifications", json=body)
            except httpx.TransportError:
                continue
            if r.status_code == 201:
                acked[f"n{i}"] = r.json()["id"]
                if len(acked) == ACKED_BEFORE_KILL:
                    proc.send_signal(signal.SIGKILL)  # hundreds more are in flight

    limits = httpx.Limits(max_connections=32)
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(
        base_url=base, limits=limits, timeout=WAIT, headers=headers, trust_env=False
    ) as client:
        await asyncio.gather(*(worker(client) for _ in range(32)))
    return acked


def check_exactly_once(device: Device, acked: set[str], committed: set[str]) -> None:
    received = device.received()
    position_of: dict[str, int] = {}
    id_at: dict[int, str] = {}
    for position, id, kind in received:
        assert kind == "created", (device.protocol, position, id, kind)
        # A repeat is allowed only as the very same change (same position).
        assert position_of.setdefault(id, position) == position, (device.protocol, id)
        assert id_at.setdefault(position, id) == id, (device.protocol, position)
    for session in device.sessions:
        positions = [p for p, _, _ in session]
        assert positions == sorted(set(positions)), f"{device.protocol}: out of order or repeated"
    missing = acked - device.ids()
    assert not missing, f"{device.protocol}: {len(missing)} acknowledged notifications never came"
    phantom = device.ids() - committed
    assert not phantom, f"{device.protocol}: {len(phantom)} delivered but not in the feed"
    # What the client keeps after dropping positions at or below the last seen: each id once.
    kept: list[str] = []
    last = 0
    for session in device.sessions:
        for position, id, _ in session:
            if position > last:
                kept.append(id)
                last = position
    assert len(kept) == len(set(kept)) == len(device.ids())


def test_devices_get_every_acknowledged_notification_once_across_a_crash(
    tmp_path: Path, store_url: str | None
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    client_id = register(tmp_path, store_url, HOST)
    issuer = LocalIssuer.load_or_create(tmp_path, "urn:herald:local", "api://herald")
    user = f"crash-{uuid.uuid4()}"
    token = issuer.mint(client_id=client_id, user_id=user)
    proc = start(tmp_path, port, store_url, HERALD_KEEPALIVE_INTERVAL="2")

    async def scenario() -> tuple[Device, Device, dict[str, str]]:
        nonlocal proc
        async with api(base, token) as a:
            subs = []
            for _ in range(2):
                r = await a.post(
                    "/beta/me/notificationSubscriptions", json=subscription_body(HOST, "live")
                )
                assert r.status_code == 201, r.text
                subs.append(r.json()["id"])
        devices = [Device("ws", subs[0]), Device("sse", subs[1])]
        # Phase 1: both devices live while the burst runs; the kill ends their streams.
        tasks = [asyncio.create_task(listen(d, base, token, resume=False)) for d in devices]
        await asyncio.wait_for(asyncio.gather(*(d.connected.wait() for d in devices)), WAIT)
        acked = await burst(base, token, proc)
        assert await asyncio.to_thread(proc.wait, 10) == -signal.SIGKILL
        await asyncio.wait_for(asyncio.gather(*tasks), WAIT)
        assert len(acked) >= ACKED_BEFORE_KILL

        # Phase 2: restart on the same data; resume each device from its last position.
        proc = await asyncio.to_thread(start, tmp_path, port, store_url)
        wanted = set(acked.values())
        done = asyncio.Event()

        def check() -> None:
            if all(wanted <= d.ids() for d in devices):
                done.set()

        tasks = [
            asyncio.create_task(listen(d, base, token, resume=True, notify=check)) for d in devices
        ]
        try:
            check()
            await asyncio.wait_for(done.wait(), 20)
            # Live continues after the catch-up.
            async with api(base, token) as a:
                r = await a.post(
                    "/beta/me/notifications",
                    json={"targetHostName": HOST, "payload": {"rawContent": "after"}},
                )
                assert r.status_code == 201
                after = r.json()["id"]
            wanted.add(after)
            acked["after"] = after
            done.clear()
            check()
            await asyncio.wait_for(done.wait(), WAIT)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return devices[0], devices[1], acked

    try:
        ws, sse, acked = asyncio.run(scenario())
        committed: set[str] = set()
        with httpx.Client(base_url=base, timeout=WAIT) as c:
            url: str | None = "/beta/me/notifications?$top=999"
            while url:
                page = c.get(url, headers={"Authorization": f"Bearer {token}"}).json()
                committed |= {n["id"] for n in page["value"]}
                url = page.get("@odata.nextLink")
    finally:
        stop(proc)
    assert set(acked.values()) <= committed
    for device in (ws, sse):
        # It streamed live before the kill, and again (catch-up, then live) after the restart.
        assert len(device.sessions) == 2 and all(device.sessions), device.protocol
        check_exactly_once(device, set(acked.values()), committed)


def test_shutdown_ends_streams_and_devices_resume_after_restart(
    tmp_path: Path, store_url: str | None
) -> None:
    """docs/devices.md: on shutdown the server sends `closing` `shutdown` and ends the stream
    (WebSocket close code 1012); the client reconnects and resumes from its last position."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    client_id = register(tmp_path, store_url, HOST)
    issuer = LocalIssuer.load_or_create(tmp_path, "urn:herald:local", "api://herald")
    token = issuer.mint(client_id=client_id, user_id=f"shutdown-{uuid.uuid4()}")
    proc = start(tmp_path, port, store_url, HERALD_KEEPALIVE_INTERVAL="2")
    ended: list[tuple[list[tuple[str, str | None]], int | None, float]] = []

    async def before() -> tuple[list[str], str]:
        async with api(base, token) as a:
            subs = []
            for _ in range(2):
                r = await a.post(
                    "/beta/me/notificationSubscriptions", json=subscription_body(HOST, "live")
                )
                assert r.status_code == 201, r.text
                subs.append(r.json()["id"])
            r = await a.post(FEED, json={"targetHostName": HOST, "payload": {"rawContent": "1"}})
            first = r.json()["id"]
        async with (
            open_stream("ws", base, subs[0], token, query_token=True) as ws,
            open_stream("sse", base, subs[1], token, query_token=True) as sse,
        ):
            assert await ws.ready() == await sse.ready() == 1
            proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            for s in (ws, sse):
                messages, end = await s.until_end()
                types = [(m["type"], m.get("reason")) for m in messages]
                ended.append((types, end.code, time.monotonic() - signalled))
        return subs, first

    try:
        subs, first = asyncio.run(before())
        # It exits by itself (uvicorn re-raises the signal after its graceful shutdown).
        assert proc.wait(15) in (0, -signal.SIGTERM)
    finally:
        stop(proc)
    # The streams were opened with ?access_token=: Herald never logs query strings.
    log = (tmp_path / "server.log").read_text()
    assert token not in log and token[-40:] not in log
    shutdown = [("closing", "shutdown")]
    assert [(types, code) for types, code, _ in ended] == [(shutdown, 1012), (shutdown, None)]
    assert all(after <= WAIT for _, _, after in ended), ended

    # After the restart both devices resume from position 1 and get what came since.
    proc = start(tmp_path, port, store_url, HERALD_KEEPALIVE_INTERVAL="2")

    async def after() -> None:
        async with api(base, token) as a:
            r = await a.post(FEED, json={"targetHostName": HOST, "payload": {"rawContent": "2"}})
            second = r.json()["id"]
            async with (
                open_stream("ws", base, subs[0], token, after=1) as ws,
                open_stream("sse", base, subs[1], token, last_event_id=1) as sse,
            ):
                for s in (ws, sse):
                    assert await s.ready() == 1
                    m = await s.next()
                    assert (m["type"], m["position"], m["id"]) == ("created", 2, second)
                    assert m["id"] != first

    try:
        asyncio.run(after())
    finally:
        stop(proc)
