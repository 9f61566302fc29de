"""Herald when PostgreSQL goes away and comes back (docs/operations.md, "When PostgreSQL fails").

A real `herald serve` under a steady stream of posts: its backends are terminated mid-traffic (as
a failover, a PgBouncer restart or an idle-connection reaper does), or a private PostgreSQL
server under it is stopped for a few seconds and started again. Writes must recover by
themselves within seconds, every failure in between must be a prompt 503 `serviceNotAvailable`
with Retry-After, `/readyz` must say 503 while writes cannot succeed, nothing answered 201 may be
lost, and the background loops (the dispatcher draining the outbox) must resume."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.devices import End, api, notification_body, open_stream, subscription_body
from tests.pg import (
    Cluster,
    application_url,
    private_cluster,
    terminate_backends,
)
from tests.traffic import HOST, Herald, Traffic, drive, serve

pytestmark = pytest.mark.postgres

# A request during an outage must be answered within this (the store's bounds are 5 s to
# connect, 15 s for a statement; a refused or terminated connection is answered at once).
ANSWER_BOUND = 5.0
RECOVERY_BOUND = 3.0  # seconds from the database being back to writes answered 201 again


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    yield from private_cluster()


def check_failures(traffic: Traffic) -> None:
    """Every failed post was a prompt, retryable 503 in Graph's shape: never a 500 or a hang."""
    for a in traffic.failed():
        assert (a.status, a.code) == (503, "serviceNotAvailable"), a
        assert a.retry_after is not None and int(a.retry_after) >= 1, a
        assert a.took < ANSWER_BOUND, a
    assert all(a.took < ANSWER_BOUND for a in traffic.posts)


def check_aftermath(herald: Herald, traffic: Traffic) -> None:
    """Nothing answered 201 was lost, and the dispatcher drained the outbox once more (it
    counts every change it publishes and removes)."""
    headers = {"Authorization": f"Bearer {herald.token}"}
    found: set[str] = set()
    with httpx.Client(base_url=herald.base, headers=headers, timeout=10) as c:
        url: str | None = "/beta/me/notifications?$top=999"
        while url:
            page = c.get(url).json()
            found |= {n["id"] for n in page["value"]}
            url = page.get("@odata.nextLink")
        assert traffic.created <= found, f"{len(traffic.created - found)} acknowledged lost"
        deadline = time.monotonic() + 10
        while dispatched(c) < len(found) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert dispatched(c) >= len(found)
        assert c.get("/readyz").status_code == 200


def dispatched(client: httpx.Client) -> float:
    text = client.get("/metrics").text
    m = re.search(r"^herald_dispatched_changes_total (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_writes_recover_after_backends_are_terminated_mid_traffic(
    tmp_path: Path, postgres_store: str
) -> None:
    name = f"herald-outage-{uuid.uuid4().hex[:8]}"
    killed: list[tuple[float, int]] = []

    def terminate() -> None:
        # Twice: the second time hits the connections that replaced the first ones.
        for _ in range(2):
            killed.append((time.monotonic(), asyncio.run(terminate_backends(postgres_store, name))))
            time.sleep(0.5)

    with serve(tmp_path, application_url(postgres_store, name)) as herald:
        traffic = asyncio.run(drive(herald, 6.0, terminate))
        assert all(n >= 2 for _, n in killed), killed  # the writers' connections at least
        check_failures(traffic)
        after = [a for a in traffic.posts if a.at > killed[-1][0] + RECOVERY_BOUND]
        assert after and all(a.status == 201 for a in after), traffic.failed()[-5:]
        check_aftermath(herald, traffic)
        # /readyz is 503 only while a write batch has failed and none succeeded since: for a
        # moment at most here (the next batch runs on new connections).
        assert traffic.ready[-1][1] == 200


def test_writes_recover_after_a_postgres_restart(tmp_path: Path, cluster: Cluster) -> None:
    name = f"herald-restart-{uuid.uuid4().hex[:8]}"
    window: dict[str, float] = {}

    def restart() -> None:
        window["stopped"] = time.monotonic()
        cluster.stop("fast")  # every session ends, new connections are refused
        time.sleep(3.0)
        window["starting"] = time.monotonic()
        cluster.start()
        window["started"] = time.monotonic()

    with serve(tmp_path, application_url(cluster.url, name)) as herald:
        traffic = asyncio.run(drive(herald, 9.0, restart))
        check_failures(traffic)
        down = [a for a in traffic.posts if window["stopped"] + 0.5 < a.at < window["starting"]]
        assert down and all(a.status == 503 for a in down), down
        ready_down = [
            s for t, s in traffic.ready if window["stopped"] + 0.5 < t < window["starting"]
        ]
        assert ready_down and set(ready_down) == {503}, ready_down
        # Back: writes and readiness recover by themselves, within RECOVERY_BOUND.
        recovered = window["started"] + RECOVERY_BOUND
        after = [a for a in traffic.posts if a.at > recovered]
        assert after and all(a.status == 201 for a in after), traffic.failed()[-5:]
        assert {s for t, s in traffic.ready if t > recovered} == {200}
        check_aftermath(herald, traffic)
        log = herald.log.read_text()
        assert "database writes failing" in log and "database writes recovered" in log


def test_a_statement_past_postgres_statement_timeout_is_answered_503(
    tmp_path: Path, postgres_store: str
) -> None:
    """A database that stops answering mid-statement (here: a lock nobody releases) costs a
    request `postgres_statement_timeout`, not the 15 s default, and writes work again after."""

    async def run(herald: Herald) -> tuple[float, int, str, int]:
        import asyncpg

        body = {"targetHostName": HOST, "payload": {"rawContent": "stuck"}}
        headers = {"Authorization": f"Bearer {herald.token}"}
        async with httpx.AsyncClient(base_url=herald.base, headers=headers, timeout=20) as c:
            assert (await c.post("/beta/me/notifications", json=body)).status_code == 201
            conn = await asyncpg.connect(postgres_store)
            try:
                lock = conn.transaction()
                await lock.start()
                await conn.execute("LOCK TABLE feed_heads IN ACCESS EXCLUSIVE MODE")
                start = time.monotonic()
                stuck = await c.post("/beta/me/notifications", json=body)
                took = time.monotonic() - start
                await lock.rollback()
            finally:
                await conn.close()
            after = await c.post("/beta/me/notifications", json=body)
            return took, stuck.status_code, stuck.json()["error"]["code"], after.status_code

    with serve(tmp_path, postgres_store, HERALD_POSTGRES_STATEMENT_TIMEOUT="1") as herald:
        took, status, code, after = asyncio.run(run(herald))
    assert (status, code) == (503, "serviceNotAvailable")
    assert 0.9 < took < 5.0, took  # the setting's 1 s (and a reconnect), not the default 15 s
    assert after == 201


@pytest.mark.parametrize("protocol", ["ws", "sse"])
def test_a_stream_whose_replay_the_database_fails_ends_with_a_reason(
    tmp_path: Path, postgres_store: str, protocol: str
) -> None:
    """The database stops answering after a stream was accepted, while it replays: the device is
    told why (`closing`, `shutdown`: reconnect to resume) and the stream ends in order. It was an
    exception in the ASGI application: the WebSocket dropped without a close frame's reason, the
    SSE response cut off without its last chunk."""

    async def run(herald: Herald) -> tuple[list[dict[str, object]], End, int]:
        import asyncpg

        async with api(herald.base, herald.token) as c:
            posted = await c.post("/beta/me/notifications", json=notification_body(HOST))
            assert posted.status_code == 201, posted.text
            created = await c.post(
                "/beta/me/notificationSubscriptions", json=subscription_body(HOST)
            )
            assert created.status_code == 201, created.text
            sub = created.json()["id"]
            conn = await asyncpg.connect(postgres_store)
            try:
                lock = conn.transaction()
                await lock.start()
                # The replay's read waits on this until the statement timeout (1 s).
                await conn.execute("LOCK TABLE changes IN ACCESS EXCLUSIVE MODE")
                async with open_stream(protocol, herald.base, sub, herald.token, after=0) as s:
                    assert await s.ready() == 0
                    messages, end = await s.until_end()
                await lock.rollback()
            finally:
                await conn.close()
            # Once the database answers, the device resumes and gets the change.
            async with open_stream(protocol, herald.base, sub, herald.token, after=0) as s:
                await s.ready()
                change = await s.next()
        return messages, end, int(str(change["position"]))

    with serve(tmp_path, postgres_store, HERALD_POSTGRES_STATEMENT_TIMEOUT="1") as herald:
        messages, end, position = asyncio.run(run(herald))
        log = herald.log.read_text()
    assert [m["type"] for m in messages] == ["closing"], messages
    assert messages[0]["reason"] == "shutdown", messages
    assert "reconnect" in str(messages[0]["message"]), messages
    if protocol == "ws":
        assert end.code == 1012, end
    else:
        assert not end.error, end
    assert position == 1
    assert "Exception in ASGI application" not in log
