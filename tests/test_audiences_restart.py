"""A send survives a SIGKILL of `herald serve` mid-way: once its 202 was answered it is in the
store whole, and after a restart the runner resumes it where it stopped, so that every recipient
ends up with exactly one notification (and one change) on either store."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from herald.auth.issuer import LocalIssuer
from tests.conftest import free_port
from tests.processes import register, start

HOST = "campaigns.example.com"
RECIPIENTS = 600
# Small paced batches: the send takes a few seconds, so the kill lands in the middle of it.
SLOW = {"HERALD_SEND_BATCH": "10", "HERALD_SEND_PAUSE": "0.02"}


def serve(data: Path, store_url: str | None) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    return start(data, port, store_url, **SLOW), f"http://127.0.0.1:{port}"


def counts(data: Path, store_url: str | None) -> tuple[dict[str, int], dict[str, int]]:
    """Per user: how many notifications, and how many changes, the store holds."""
    notifications = "SELECT user_id, count(*) FROM notifications GROUP BY user_id"
    changes = "SELECT user_id, count(*) FROM changes GROUP BY user_id"
    if store_url is None:
        with sqlite3.connect(data / "herald.db") as conn:
            found = [dict(conn.execute(q).fetchall()) for q in (notifications, changes)]
        conn.close()
        return found[0], found[1]

    async def read() -> tuple[dict[str, int], dict[str, int]]:
        import asyncpg

        conn = await asyncpg.connect(store_url)
        try:
            n = {r[0]: r[1] for r in await conn.fetch(notifications)}
            c = {r[0]: r[1] for r in await conn.fetch(changes)}
            return n, c
        finally:
            await conn.close()

    return asyncio.run(read())


def operation(base: str, token: str, location: str) -> dict[str, Any]:
    path = location.split("/", 3)[3]  # the path: the port changes with the restart
    r = httpx.get(f"{base}/{path}", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_a_send_resumes_after_a_kill_without_duplicates_or_losses(
    tmp_path: Path, store_url: str | None
) -> None:
    client_id = register(tmp_path, store_url, HOST)
    token = LocalIssuer.load_or_create(tmp_path, "urn:herald:local", "api://herald").mint(
        client_id=client_id, user_id=None
    )
    users = [f"r-{i:05d}-{uuid.uuid4().hex[:6]}" for i in range(RECIPIENTS)]
    body = {
        "userIds": users,
        "notification": {"targetHostName": HOST, "payload": {"rawContent": "sale"}},
    }
    process, base = serve(tmp_path, store_url)
    try:
        r = httpx.post(
            f"{base}/beta/sendNotification",
            json=body,
            headers={"Authorization": f"Bearer {token}", "Idempotency-Key": "spring-sale"},
            timeout=30,
        )
        assert r.status_code == 202, r.text
        location = r.headers["location"]
        deadline = time.monotonic() + 30
        while (op := operation(base, token, location))["processedCount"] < RECIPIENTS // 5:
            assert time.monotonic() < deadline, op
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        assert process.wait(10) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    before = counts(tmp_path, store_url)[0]
    assert 0 < len(before) < RECIPIENTS, len(before)  # the kill was mid-send

    process, base = serve(tmp_path, store_url)
    try:
        deadline = time.monotonic() + 60
        while (op := operation(base, token, location))["status"] != "succeeded":
            assert op["status"] in ("notStarted", "running"), op
            assert time.monotonic() < deadline, op
            time.sleep(0.05)
        assert (op["processedCount"], op["succeededCount"], op["failedCount"]) == (
            RECIPIENTS,
            RECIPIENTS,
            0,
        )
        # The replayed request after the restart is the same operation.
        again = httpx.post(
            f"{base}/beta/sendNotification",
            json=body,
            headers={"Authorization": f"Bearer {token}", "Idempotency-Key": "spring-sale"},
            timeout=30,
        )
        assert (again.status_code, again.json()["id"]) == (202, op["id"])
    finally:
        process.terminate()
        process.wait(10)
    notifications, changes = counts(tmp_path, store_url)
    assert notifications == dict.fromkeys(users, 1)
    assert changes == dict.fromkeys(users, 1)
