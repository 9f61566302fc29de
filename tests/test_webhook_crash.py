"""Webhooks lose nothing across a SIGKILL of Herald: `herald serve` as a real process is killed
mid-delivery while app servers post, restarted, and the receiver ends with every committed
change, each user's in position order. Delivery is at least once: the batch in flight when the
process died is sent again, and the receiver de-duplicates by event id."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import uuid
from pathlib import Path

import httpx

from herald.auth.issuer import LocalIssuer
from tests.conftest import free_port
from tests.hooks import Receiver
from tests.processes import register, start

USERS = 5
HELD = 4  # the receiver holds the 4th POST unanswered: Herald is killed while it waits
POSTS = 300
SETTINGS = {
    "HERALD_WEBHOOK_ALLOW_PRIVATE_ENDPOINTS": "true",
    "HERALD_WEBHOOK_POLL_INTERVAL": "0.05",
    "HERALD_WEBHOOK_BATCH": "5",  # many small POSTs: the kill lands mid-delivery
    "HERALD_WEBHOOK_BACKOFF_BASE": "0.1",
    "HERALD_WEBHOOK_TIMEOUT": "2",
}


async def burst(
    base: str, tokens: list[str], proc: subprocess.Popen[bytes], sink: Receiver
) -> dict[str, str]:
    """Post until killed (SIGKILL once the receiver has a few batches); the acknowledged
    notifications: appNotificationId -> id."""
    acked: dict[str, str] = {}
    numbers = iter(range(POSTS))

    async def worker(client: httpx.AsyncClient) -> None:
        for i in numbers:
            anid = f"n{i}"
            try:
                r = await client.post(
                    f"{base}/beta/me/notifications",
                    headers={"Authorization": f"Bearer {tokens[i % USERS]}"},
                    json={
                        "targetHostName": "crash.example.com",
                        "appNotificationId": anid,
                        "payload": {"rawContent": anid},
                    },
                )
            except httpx.TransportError:
                return
            if r.status_code == 201:
                acked[anid] = r.json()["id"]
            if len(sink.received) >= HELD and proc.poll() is None:
                proc.send_signal(signal.SIGKILL)  # the receiver is holding a batch

    async with httpx.AsyncClient(timeout=10) as client:
        await asyncio.gather(*(worker(client) for _ in range(8)))
    return acked


def test_sigkill_mid_delivery_loses_no_change(tmp_path: Path, store_url: str | None) -> None:

    sink = Receiver()
    sink.plan = [200] * (HELD - 1) + [5.0]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    client_id = register(tmp_path, store_url, "crash.example.com")
    issuer = LocalIssuer.load_or_create(tmp_path, "urn:herald:local", "api://herald")
    users = [f"crash-{uuid.uuid4()}" for _ in range(USERS)]
    tokens = [issuer.mint(client_id=client_id, user_id=u) for u in users]
    app_token = issuer.mint(client_id=client_id, user_id=None)
    proc = start(tmp_path, port, store_url, **SETTINGS)
    try:
        r = httpx.post(
            f"{base}/beta/notificationWebhooks",
            headers={"Authorization": f"Bearer {app_token}"},
            json={"url": sink.url, "changeTypes": ["created"]},
        )
        assert r.status_code == 201, r.text
        acked = asyncio.run(burst(base, tokens, proc, sink))
        assert proc.wait(10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    before = len(sink.received)
    assert before >= HELD and len(acked) >= 10
    held = {e["id"] for e in sink.received[HELD - 1].events}
    proc = start(tmp_path, port, store_url, **SETTINGS)
    try:
        sink.wait(lambda _: set(acked.values()) <= delivered(sink), timeout=20)
    finally:
        proc.terminate()
        proc.wait(10)
        sink.close()
    events = sink.events()
    for user in users:
        positions = [e["position"] for e in events if e["userId"] == user]
        # Every change of the user (committed, acknowledged or not), once, in order.
        assert positions == list(range(1, len(positions) + 1)), user
    # The held batch was sent again after the restart (Herald never saw its answer).
    again = {e["id"] for r in sink.accepted()[HELD - 1 :] for e in r.events}
    assert held <= again
    duplicates = sum(len(r.events) for r in sink.accepted()) - len(events)
    print(f"acked {len(acked)}, delivered {len(events)}, sent twice {duplicates + len(held)}")


def delivered(sink: Receiver) -> set[str]:
    return {e["notificationId"] for e in sink.events()}
