"""A SIGKILL soak with an Idempotency-Key on every write: post continuously, kill `herald serve`
again and again, restart it, and retry every key that got no answer with the same key and body,
as a client must. Then check that every acknowledged key has exactly one notification and every
key at most one.

Each key's body carries the key itself (rawContent) and no appNotificationId, so a second write
of a key would be a second notification, not a replacement, and can be counted. Used by
`benchmarks/idempotency_soak.py` (long, prints figures) and tests/test_idempotency.py (short)."""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from herald.auth.issuer import LocalIssuer
from tests.conftest import free_port
from tests.processes import register, start

HOST = "soak.example.com"


@dataclass
class Result:
    kills: int = 0
    posted: int = 0  # keys
    requests: int = 0  # posts sent, retries included
    acknowledged: int = 0  # keys answered 201 or 200
    retried: int = 0  # keys posted more than once
    refused: Counter[int] = field(default_factory=Counter)  # answers other than 2xx, by status
    duplicates: int = 0  # keys with more than one notification
    lost: int = 0  # acknowledged keys with no notification
    mismatched: int = 0  # acknowledged keys whose answer names another notification
    stored: int = 0  # notifications found at the end
    seconds: float = 0.0

    @property
    def clean(self) -> bool:
        """No duplicate, nothing lost, every answer true, and no refusal but 503."""
        wrong = self.duplicates or self.lost or self.mismatched
        return not wrong and set(self.refused) <= {503} and self.acknowledged == self.posted > 0

    def summary(self) -> str:
        refused = ", ".join(f"{n}×{s}" for s, n in sorted(self.refused.items())) or "none"
        return (
            f"kills {self.kills}, keys {self.posted}, requests {self.requests},"
            f" acknowledged {self.acknowledged}, retried keys {self.retried},"
            f" notifications {self.stored}, duplicates {self.duplicates}, lost {self.lost},"
            f" mismatched answers {self.mismatched}, non-2xx answers {refused},"
            f" {self.seconds:.1f} s"
        )


@dataclass
class _Key:
    name: str
    user: int
    attempts: int = 0
    answer: str | None = None  # the notification id of its 2xx answer


class Soak:
    """One soak on a data directory and store (None: SQLite under the data directory)."""

    def __init__(
        self,
        data: Path,
        store_url: str | None,
        users: int = 8,
        workers: int = 32,
        seed: int = 1,
    ) -> None:
        self.data = data
        self.store_url = store_url
        self.workers = workers
        self.random = random.Random(seed)
        client_id = register(data, store_url, HOST)
        issuer = LocalIssuer.load_or_create(data, "urn:herald:local", "api://herald")
        self.users = [f"soak-{uuid.uuid4()}" for _ in range(users)]
        self.tokens = [issuer.mint(client_id=client_id, user_id=u) for u in self.users]
        self.port = free_port()
        self.keys: list[_Key] = []
        self.unanswered: list[_Key] = []
        self.result = Result()

    def run(self, kills: int, between: tuple[float, float] = (0.3, 1.5)) -> Result:
        """`kills` rounds of: serve, post for a random time in `between`, SIGKILL; then serve
        once more, retry every unanswered key until answered, and count."""
        began = time.monotonic()
        for _ in range(kills):
            process = self._serve()
            try:
                asyncio.run(self._traffic(process, self.random.uniform(*between)))
            finally:
                if process.poll() is None:
                    process.kill()
                process.wait(10)
        process = self._serve()
        try:
            asyncio.run(self._settle())
            self._count()
        finally:
            process.terminate()
            process.wait(10)
        self.result.seconds = time.monotonic() - began
        return self.result

    def _serve(self) -> subprocess.Popen[bytes]:
        return start(self.data, self.port, self.store_url)

    async def _traffic(self, process: subprocess.Popen[bytes], seconds: float) -> None:
        """Post (retries first) until killed after `seconds`."""
        stop = asyncio.Event()

        async def killer() -> None:
            await asyncio.sleep(seconds)
            process.send_signal(signal.SIGKILL)  # requests are in flight
            await asyncio.to_thread(process.wait)
            self.result.kills += 1
            stop.set()

        async with self._client() as client:
            await asyncio.gather(killer(), *(self._worker(client, stop) for _ in self._slots()))

    async def _settle(self) -> None:
        """Retry every unanswered key on a server that stays up, until all are answered."""
        async with self._client() as client:
            while self.unanswered:
                await asyncio.gather(*(self._worker(client, None) for _ in self._slots()))

    async def _worker(self, client: httpx.AsyncClient, stop: asyncio.Event | None) -> None:
        while (stop is None and self.unanswered) or (stop is not None and not stop.is_set()):
            if self.unanswered:
                key = self.unanswered.pop()
            elif stop is None:
                return
            else:
                n = len(self.keys)
                key = _Key(f"soak-{n}-{uuid.uuid4().hex[:8]}", n % len(self.users))
                self.keys.append(key)
                self.result.posted += 1
            if not await self._post(client, key):
                self.unanswered.append(key)
                await asyncio.sleep(0.05)  # down, or refusing: back off a little

    async def _post(self, client: httpx.AsyncClient, key: _Key) -> bool:
        """Post the key once; whether it got its final answer."""
        key.attempts += 1
        if key.attempts == 2:
            self.result.retried += 1
        self.result.requests += 1
        body = {"targetHostName": HOST, "payload": {"rawContent": key.name}}
        headers = {
            "Authorization": f"Bearer {self.tokens[key.user]}",
            "Idempotency-Key": key.name,
        }
        try:
            r = await client.post("/beta/me/notifications", json=body, headers=headers)
        except httpx.TransportError:
            return False  # no answer: the server died (or was not up yet)
        if r.status_code in (200, 201):
            if key.answer is None:
                self.result.acknowledged += 1
            key.answer = r.json()["id"]
            return True
        self.result.refused[r.status_code] += 1
        return r.status_code < 500  # 4xx is final (and a failure of the soak); 5xx: retry

    def _count(self) -> None:
        found: Counter[str] = Counter()
        ids: dict[str, str] = {}
        with httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=30) as c:
            for token in self.tokens:
                url: str | None = "/beta/me/notifications?$top=999"
                while url:
                    r = c.get(url, headers={"Authorization": f"Bearer {token}"})
                    page = r.json()
                    for n in page["value"]:
                        raw = n["payload"]["rawContent"]
                        found[raw] += 1
                        ids[raw] = n["id"]
                    url = page.get("@odata.nextLink")
        result = self.result
        result.stored = sum(found.values())
        result.duplicates = sum(1 for n in found.values() if n > 1)
        answered = [k for k in self.keys if k.answer is not None]
        result.lost = sum(1 for k in answered if found[k.name] == 0)
        result.mismatched = sum(
            1 for k in answered if found[k.name] == 1 and ids[k.name] != k.answer
        )

    def _client(self) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=self.workers)
        base = f"http://127.0.0.1:{self.port}"
        return httpx.AsyncClient(base_url=base, limits=limits, timeout=30)

    def _slots(self) -> range:
        return range(self.workers)
