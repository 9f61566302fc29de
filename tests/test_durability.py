"""Nothing acknowledged is lost: SIGKILL a real `herald serve` in the middle of a burst of
posts, restart it on the same data, and find every notification that was answered 201."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from herald.auth.issuer import LocalIssuer
from tests.conftest import free_port

USERS = 8


def start(data: Path, port: int, store_url: str | None) -> subprocess.Popen[bytes]:
    env = {**os.environ, "HERALD_APP_RATE": "1000000", "HERALD_APP_BURST": "1000000"}
    env |= {"HERALD_USER_RATE": "1000000", "HERALD_USER_BURST": "1000000"}
    args = [sys.executable, "-m", "herald", "serve", "--data", str(data), "--port", str(port)]
    if store_url:
        args += ["--store", store_url]
    with (data / "server.log").open("ab") as log:  # a file, not a pipe: a full pipe blocks
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=log)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise RuntimeError((data / "server.log").read_text())
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("herald serve did not become ready")


def register(data: Path, store_url: str | None) -> str:
    args = [sys.executable, "-m", "herald", "app", "create", "--host-name", "crash.example.com"]
    args += ["--data", str(data)] + (["--store", store_url] if store_url else [])
    out = subprocess.run(args, check=True, capture_output=True).stdout
    return str(json.loads(out)["clientId"])


async def burst(base: str, tokens: list[str], proc: subprocess.Popen[bytes]) -> dict[str, str]:
    """Post until the server is killed; return the acknowledged (appNotificationId -> id)."""
    acked: dict[str, str] = {}
    limits = httpx.Limits(max_connections=64)

    async def post(client: httpx.AsyncClient, i: int) -> None:
        body = {
            "targetHostName": "crash.example.com",
            "appNotificationId": f"n{i}",
            "payload": {"rawContent": f"message {i}"},
        }
        headers = {"Authorization": f"Bearer {tokens[i % USERS]}"}
        try:
            r = await client.post(f"{base}/beta/me/notifications", json=body, headers=headers)
        except httpx.TransportError:
            return
        if r.status_code == 201:
            acked[f"n{i}"] = r.json()["id"]
            if len(acked) == 300:
                proc.send_signal(signal.SIGKILL)  # mid-burst: hundreds more are in flight

    numbers = iter(range(1500))

    async def worker(client: httpx.AsyncClient) -> None:
        # A fixed set of connections posting back to back, like app servers do (a gather of
        # 1500 coroutines on one client pool starves httpx's connection setup instead).
        for i in numbers:
            await post(client, i)

    async with httpx.AsyncClient(limits=limits, timeout=10) as client:
        await asyncio.gather(*(worker(client) for _ in range(64)))
    return acked


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest) -> Iterator[str | None]:
    if request.param == "sqlite":
        yield None
        return
    from tests.pg import fresh_database

    yield from fresh_database()


def test_sigkill_mid_burst_loses_nothing_acknowledged(
    tmp_path: Path, store_url: str | None
) -> None:
    port = free_port()
    client_id = register(tmp_path, store_url)
    issuer = LocalIssuer.load_or_create(tmp_path, "urn:herald:local", "api://herald")
    users = [f"crash-{uuid.uuid4()}" for _ in range(USERS)]
    tokens = [issuer.mint(client_id=client_id, user_id=u) for u in users]
    proc = start(tmp_path, port, store_url)
    try:
        acked = asyncio.run(burst(f"http://127.0.0.1:{port}", tokens, proc))
        assert proc.wait(10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert len(acked) >= 300
    proc = start(tmp_path, port, store_url)
    try:
        found: dict[str, str] = {}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
            for token in tokens:
                url: str | None = "/beta/me/notifications?$top=999"
                while url:
                    page = c.get(url, headers={"Authorization": f"Bearer {token}"}).json()
                    found |= {n["appNotificationId"]: n["id"] for n in page["value"]}
                    url = page.get("@odata.nextLink")
        missing = {k: v for k, v in acked.items() if found.get(k) != v}
        assert not missing, f"{len(missing)} acknowledged notifications lost"
    finally:
        proc.terminate()
        proc.wait(10)
