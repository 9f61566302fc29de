"""A lossy PostgreSQL failover under a running `herald serve`: a private primary with an
asynchronous streaming standby, the standby cut off before the last posts, the primary crashed,
the standby promoted; Herald reaches it through its multi-host URL without a restart.

Devices that hold a position issued on the lost commits are told to resync (410) on the stream
and in delta, and so is an app whose change-feed cursor was lost; those holding an older position
resume and get what follows; new changes get positions past the skipped range; a stream open
across the failover is closed, so its device resumes (store/postgres/epoch.py)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from herald.auth.issuer import LocalIssuer
from herald.store.postgres.epoch import GAP
from tests.conftest import free_port
from tests.pg import Cluster, replicated_pair
from tests.processes import register, start

pytestmark = pytest.mark.postgres

APP = "failover.example.com"
FEED = "/beta/notificationChanges"
DELTA = "/beta/me/notifications/delta"


def test_a_lossy_failover_makes_the_devices_with_lost_positions_resync(tmp_path: Path) -> None:
    for primary, standby in replicated_pair():
        url = (
            f"postgresql://postgres@127.0.0.1:{primary.port},127.0.0.1:{standby.port}/postgres"
            "?target_session_attrs=read-write"
        )
        client_id = register(tmp_path, url, APP)
        issuer = LocalIssuer.load_or_create(tmp_path, "urn:herald:local", "api://herald")
        user = f"u-{uuid.uuid4()}"
        tokens = (
            issuer.mint(client_id=client_id, user_id=user),
            issuer.mint(client_id=client_id, user_id=None),  # the app server's, for the feed
        )
        port = free_port()
        proc = start(tmp_path, port, url)
        try:
            asyncio.run(_scenario(f"http://127.0.0.1:{port}", tokens, primary, standby))
        finally:
            proc.kill()
            proc.wait()


async def _scenario(base: str, tokens: tuple[str, str], primary: Cluster, standby: Cluster) -> None:
    user, app = (httpx.AsyncClient(base_url=base, timeout=10, headers=_auth(t)) for t in tokens)
    async with user, app:
        sub = await user.post(
            "/beta/me/notificationSubscriptions", json={"application": APP, "platform": "live"}
        )
        assert sub.status_code == 201, sub.text
        stream_path = f"/beta/me/notificationSubscriptions/{sub.json()['id']}/stream"
        assert (await app.get(FEED)).status_code == 200  # the app's feed records from now on

        # Replicated: positions 1-3, and the feed's entries for them.
        for i in range(3):
            await _post(user, f"kept-{i}")
        kept = await _delta_token(user, None)
        kept_feed = await _feed_cursor(app, None)
        assert kept == 3
        await _caught_up(primary, standby)
        await asyncio.to_thread(standby.stop, "fast")  # receives nothing from here on

        # Lost: positions 4-6, acknowledged, held by a device and by the app.
        for i in range(3):
            await _post(user, f"lost-{i}")
        lost = await _delta_token(user, kept)
        lost_feed = await _feed_cursor(app, kept_feed)
        assert lost == 6 and lost_feed != kept_feed
        # A stream open across the failover, live once it has replayed the last lost change.
        live = asyncio.Event()
        open_stream = asyncio.create_task(
            _read_stream(user, stream_path, lost - 1, until="closing", live=live)
        )
        await asyncio.wait_for(live.wait(), 10)

        await asyncio.to_thread(primary.stop, "immediate")  # a crash: the standby never gets 4-6
        await asyncio.to_thread(standby.start)
        await asyncio.to_thread(standby.promote)
        await _ready(base)

        # The stream that had sent the lost changes is closed: its device resumes.
        events = await asyncio.wait_for(open_stream, 10)
        assert events[-1][0] == "closing" and events[-1][1]["reason"] == "shutdown", events

        # Before any new post: the lost position is gone (not "ahead of the feed")...
        r = await user.get(DELTA, params={"$deltatoken": str(lost)})
        assert r.status_code == 410, r.text
        assert r.json()["error"]["code"] == "syncStateNotFound"
        r = await user.get(stream_path, params={"after": str(lost)})
        assert r.status_code == 410, r.text
        r = await user.get(stream_path, headers={"Last-Event-ID": str(lost)})
        assert r.status_code == 410, r.text
        r = await app.get(FEED, params={"$deltatoken": lost_feed})
        assert r.status_code == 410, r.text
        # ...and the kept one resumes with nothing missed.
        r = await user.get(DELTA, params={"$deltatoken": str(kept)})
        assert r.status_code == 200 and r.json()["value"] == [], r.text

        # New posts come after the skipped range, and reach the devices that resume.
        new = [await _post(user, f"new-{i}") for i in range(4)]
        r = await user.get(DELTA, params={"$deltatoken": str(kept)})
        assert [n["id"] for n in r.json()["value"]] == new
        replayed = await _read_stream(user, stream_path, kept, until=len(new))
        positions = [e[1]["position"] for e in replayed if e[0] == "created"]
        assert positions == [kept + GAP + i for i in range(1, 5)], replayed
        feed = await app.get(FEED, params={"$deltatoken": kept_feed})
        assert [e["notificationId"] for e in feed.json()["value"]] == new
        # Once new changes pass the lost position, it is still gone (not a silent skip).
        r = await user.get(DELTA, params={"$deltatoken": str(lost)})
        assert r.status_code == 410, r.text
        r = await app.get(FEED, params={"$deltatoken": lost_feed})
        assert r.status_code == 410, r.text


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _post(c: httpx.AsyncClient, anid: str) -> str:
    body = {"targetHostName": APP, "appNotificationId": anid, "payload": {"rawContent": anid}}
    r = await c.post("/beta/me/notifications", json=body)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


async def _delta_token(c: httpx.AsyncClient, after: int | None) -> int:
    params = {} if after is None else {"$deltatoken": str(after)}
    r = await c.get(DELTA, params=params)
    assert r.status_code == 200, r.text
    return int(httpx.URL(r.json()["@odata.deltaLink"]).params["$deltatoken"])


async def _feed_cursor(c: httpx.AsyncClient, after: str | None) -> str:
    """Read the app's feed to its end; the deltaLink's token."""
    r = await c.get(FEED, params={} if after is None else {"$deltatoken": after})
    assert r.status_code == 200, r.text
    return str(httpx.URL(r.json()["@odata.deltaLink"]).params["$deltatoken"])


async def _read_stream(
    c: httpx.AsyncClient,
    path: str,
    after: int,
    until: str | int,
    live: asyncio.Event | None = None,
) -> list[tuple[str, dict[str, Any]]]:
    """The (event, data) of an SSE stream resumed after `after`, up to the first event named
    `until` or the `until`-th change; `live` is set at the first change (resumed one before the
    newest, the replay has then ended: the stream reads the store no more)."""
    events: list[tuple[str, dict[str, Any]]] = []
    kind = ""
    async with c.stream("GET", path, params={"after": str(after)}, timeout=15) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((kind, json.loads(line.removeprefix("data: "))))
                if kind not in ("ready", "closing") and live is not None:
                    live.set()
                changes = sum(1 for e in events if e[0] not in ("ready", "closing"))
                if kind == until or changes == until:
                    return events
    return events


async def _caught_up(primary: Cluster, standby: Cluster) -> None:
    """Wait until the standby has replayed everything the primary has written so far."""
    p = await asyncpg.connect(primary.url)
    s = await asyncpg.connect(standby.url)
    try:
        target = await p.fetchval("SELECT pg_current_wal_lsn()")
        deadline = time.monotonic() + 10
        while not await s.fetchval("SELECT pg_last_wal_replay_lsn() >= $1", target):
            assert time.monotonic() < deadline, "the standby did not catch up"
            await asyncio.sleep(0.05)
    finally:
        await p.close()
        await s.close()


async def _ready(base: str) -> None:
    """Wait for Herald's readiness: a write probe went through on the promoted standby."""
    deadline = time.monotonic() + 20
    async with httpx.AsyncClient(base_url=base, timeout=2) as c:
        while True:
            try:
                if (await c.get("/readyz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "Herald did not reach the promoted standby"
            await asyncio.sleep(0.1)
