"""Nothing acknowledged is lost: SIGKILL a real `herald serve` in the middle of a burst of
posts, restart it on the same data, and find every notification that was answered 201."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import uuid
from pathlib import Path

import httpx

from herald.auth.issuer import LocalIssuer
from tests.conftest import free_port
from tests.processes import register, start

USERS = 8


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


def test_sigkill_mid_burst_loses_nothing_acknowledged(
    tmp_path: Path, store_url: str | None
) -> None:
    port = free_port()
    client_id = register(tmp_path, store_url, "crash.example.com")
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
