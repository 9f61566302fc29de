"""Herald when PostgreSQL goes away and comes back (docs/operations.md, "When PostgreSQL fails").

A real `herald serve` under a steady stream of posts: its backends are terminated mid-traffic (as
a failover, a PgBouncer restart or an idle-connection reaper does), or a private PostgreSQL
server under it is stopped for a few seconds and started again. Writes must recover by
themselves within seconds, every failure in between must be a prompt 503 `serviceNotAvailable`
with Retry-After, `/readyz` must say 503 while writes cannot succeed, nothing answered 201 may be
lost, and the background loops (the dispatcher draining the outbox) must resume."""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from herald.auth.issuer import LocalIssuer
from tests.conftest import free_port
from tests.pg import (
    Cluster,
    application_url,
    fresh_database,
    private_cluster,
    terminate_backends,
)
from tests.processes import register, start

pytestmark = pytest.mark.postgres

HOST = "outage.example.com"
WORKERS = 8
# A request during an outage must be answered within this (the store's bounds are 5 s to
# connect, 15 s for a statement; a refused or terminated connection is answered at once).
ANSWER_BOUND = 5.0
RECOVERY_BOUND = 3.0  # seconds from the database being back to writes answered 201 again


@dataclass
class Answer:
    at: float  # monotonic, when the request was sent
    took: float
    status: int
    code: str | None = None
    retry_after: str | None = None


@dataclass
class Traffic:
    """What the posters and the readiness poller saw."""

    posts: list[Answer] = field(default_factory=list)
    ready: list[tuple[float, int]] = field(default_factory=list)
    created: set[str] = field(default_factory=set)  # ids answered 201

    def failed(self) -> list[Answer]:
        return [a for a in self.posts if a.status != 201]

    def last_failure_after(self, since: float) -> float | None:
        failures = [a.at for a in self.failed() if a.at >= since]
        return max(failures) if failures else None


@dataclass
class Herald:
    base: str
    token: str
    process: subprocess.Popen[bytes]
    log: Path


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    yield from private_cluster()


@pytest.fixture
def database() -> Iterator[str]:
    yield from fresh_database()


@contextlib.contextmanager
def serve(tmp_path: Path, store_url: str) -> Iterator[Herald]:
    client_id = register(tmp_path, store_url, HOST)
    issuer = LocalIssuer.load_or_create(tmp_path, "urn:herald:local", "api://herald")
    token = issuer.mint(client_id=client_id, user_id=f"outage-{uuid.uuid4()}")
    port = free_port()
    process = start(tmp_path, port, store_url)
    try:
        yield Herald(f"http://127.0.0.1:{port}", token, process, tmp_path / "server.log")
    finally:
        process.terminate()
        try:
            process.wait(10)  # a clean shutdown, also after the database went away
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


async def drive(herald: Herald, seconds: float, fault: Callable[[], object]) -> Traffic:
    """Post from WORKERS connections and poll /readyz for `seconds`; call `fault` (in a thread,
    so it may block) once a second has passed. Returns what was seen."""
    traffic = Traffic()
    body = {"targetHostName": HOST, "payload": {"rawContent": "outage"}}
    headers = {"Authorization": f"Bearer {herald.token}"}
    end = time.monotonic() + seconds

    async def poster(client: httpx.AsyncClient) -> None:
        while time.monotonic() < end:
            sent = time.monotonic()
            r = await client.post("/beta/me/notifications", json=body, headers=headers)
            answer = Answer(sent, time.monotonic() - sent, r.status_code)
            if r.status_code == 201:
                traffic.created.add(r.json()["id"])
            else:
                answer.code = r.json()["error"]["code"]
                answer.retry_after = r.headers.get("retry-after")
                await asyncio.sleep(0.05)  # a client backing off, a little
            traffic.posts.append(answer)

    async def poller(client: httpx.AsyncClient) -> None:
        while time.monotonic() < end:
            r = await client.get("/readyz")
            traffic.ready.append((time.monotonic(), r.status_code))
            await asyncio.sleep(0.1)

    async def breaker() -> None:
        await asyncio.sleep(1.0)
        await asyncio.to_thread(fault)

    limits = httpx.Limits(max_connections=WORKERS + 1)
    async with httpx.AsyncClient(base_url=herald.base, limits=limits, timeout=30) as client:
        await asyncio.gather(*(poster(client) for _ in range(WORKERS)), poller(client), breaker())
    return traffic


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
    tmp_path: Path, database: str
) -> None:
    name = f"herald-outage-{uuid.uuid4().hex[:8]}"
    killed: list[tuple[float, int]] = []

    def terminate() -> None:
        # Twice: the second time hits the connections that replaced the first ones.
        for _ in range(2):
            killed.append((time.monotonic(), asyncio.run(terminate_backends(database, name))))
            time.sleep(0.5)

    with serve(tmp_path, application_url(database, name)) as herald:
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
