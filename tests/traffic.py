"""Steady post traffic against a real `herald serve`, with `/readyz` polled beside it and every
answer recorded with its timing: for tests and benchmarks that break the database underneath
(tests/test_outage.py, benchmarks/outage.py)."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from herald.auth.issuer import LocalIssuer
from tests.conftest import free_port
from tests.processes import register, start

HOST = "outage.example.com"
WORKERS = 8


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

    def last_failure_answered(self, since: float) -> float | None:
        """When the last failed post sent after `since` was answered (monotonic)."""
        failures = [a.at + a.took for a in self.failed() if a.at >= since]
        return max(failures) if failures else None

    def first_ready(self, since: float) -> float | None:
        """The first /readyz answered 200 after `since` (monotonic), if any."""
        return next((t for t, status in self.ready if t > since and status == 200), None)


@dataclass
class Herald:
    base: str
    token: str
    process: subprocess.Popen[bytes]
    log: Path


@contextlib.contextmanager
def serve(tmp_path: Path, store_url: str, **env: str) -> Iterator[Herald]:
    client_id = register(tmp_path, store_url, HOST)
    issuer = LocalIssuer.load_or_create(tmp_path, "urn:herald:local", "api://herald")
    token = issuer.mint(client_id=client_id, user_id=f"outage-{uuid.uuid4()}")
    port = free_port()
    process = start(tmp_path, port, store_url, **env)
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
