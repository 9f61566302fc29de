"""The SQLite WAL stays under `sqlite_wal_limit` under sustained writes and shrinks when idle; a
full disk is answered 503 with Retry-After and /readyz says not ready, both recover once space
is freed, and nothing acknowledged is lost. Against a real `herald serve`; the disk-full test
puts the database on a small tmpfs it mounts (the tests run as root in CI)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from herald.auth.issuer import LocalIssuer
from tests.conftest import free_port
from tests.processes import register, start

MIB = 1024 * 1024
LIMIT = 2 * MIB
# A batch that begins just under the limit may end past it by its own frames (16 posts here).
SLACK = MIB // 2
HOST = "wal.example.com"
USERS = 16
IDLE_WAIT = 15.0  # an idle WAL is truncated after 5 s without a write (checkpointer.py)


class Sampler:
    """Polls a file's size every few milliseconds on a thread; keeps the largest."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.largest = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.largest = max(self.largest, self.size())

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def tokens(data: Path, client_id: str) -> list[str]:
    issuer = LocalIssuer.load_or_create(data, "urn:herald:local", "api://herald")
    return [issuer.mint(client_id=client_id, user_id=f"wal-{uuid.uuid4()}") for _ in range(USERS)]


def body(key: str, size: int = 1000) -> dict[str, object]:
    return {"targetHostName": HOST, "appNotificationId": key, "payload": {"rawContent": "x" * size}}


async def load(base: str, keys: list[str], seconds: float) -> dict[str, int]:
    """16 connections posting back to back for `seconds`: appNotificationId -> status."""
    statuses: dict[str, int] = {}
    end = time.monotonic() + seconds

    async def worker(n: int, client: httpx.AsyncClient) -> None:
        headers = {"Authorization": f"Bearer {keys[n]}"}
        i = 0
        while time.monotonic() < end:
            key = f"load-{n}-{i}-{uuid.uuid4().hex[:8]}"
            i += 1
            r = await client.post(f"{base}/beta/me/notifications", json=body(key), headers=headers)
            statuses[key] = r.status_code

    async with httpx.AsyncClient(timeout=30) as client:
        await asyncio.gather(*(worker(n, client) for n in range(USERS)))
    return statuses


def metric(base: str, line_start: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(line_start))


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_wal_stays_under_its_limit_under_sustained_writes_and_shrinks_when_idle(
    tmp_path: Path,
) -> None:
    client_id = register(tmp_path, None, HOST)
    keys = tokens(tmp_path, client_id)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start(tmp_path, port, None, HERALD_SQLITE_WAL_LIMIT=str(LIMIT))
    try:
        wal = Sampler(tmp_path / "herald.db-wal")
        with wal:
            statuses = asyncio.run(load(base, keys, seconds=4))
        assert set(statuses.values()) == {201}
        # The WAL never grew past its limit (by more than one batch)...
        assert wal.largest <= LIMIT + SLACK, f"WAL reached {wal.largest} bytes"
        # ...though the load wrote many times that: it was started over again and again.
        restarts = metric(base, 'herald_sqlite_checkpoints_total{mode="restart",outcome="done"}')
        assert restarts >= 3, (restarts, len(statuses))
        # Idle: the WAL is truncated to nothing.
        deadline = time.monotonic() + IDLE_WAIT
        while wal.size() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert wal.size() == 0
    finally:
        stop(proc)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs, unmounted afterwards."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def fill(path: Path) -> None:
    """Write `path` until the file system has no space left."""
    chunk = b"\0" * (256 * 1024)
    with path.open("wb", buffering=0) as f:
        for size in (len(chunk), 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    f.write(chunk[:size])
    assert os.statvfs(path.parent).f_bavail == 0


def free(path: Path) -> int:
    fs = os.statvfs(path)
    return fs.f_bavail * fs.f_frsize


def test_full_disk_answers_503_and_unready_then_recovers_losing_nothing(
    tmp_path: Path, tmpfs: Path
) -> None:
    store_url = f"sqlite:///{tmpfs}/herald.db"  # the database on the tmpfs, logs and keys not
    client_id = register(tmp_path, store_url, HOST)
    (token,) = tokens(tmp_path, client_id)[:1]
    port = free_port()
    env = {"HERALD_SQLITE_WAL_LIMIT": str(MIB), "HERALD_SQLITE_LOCK_TIMEOUT": "2"}
    proc = start(tmp_path, port, store_url, **env)
    acked: dict[str, str] = {}  # appNotificationId -> id, of every 201
    refused: list[str] = []
    headers = {"Authorization": f"Bearer {token}"}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30, headers=headers) as c:

            def post(key: str) -> httpx.Response:
                r = c.post("/beta/me/notifications", json=body(key, 2000))
                if r.status_code == 201:
                    acked[key] = r.json()["id"]
                return r

            for i in range(50):
                assert post(f"before-{i}").status_code == 201
            wal = Sampler(tmpfs / "herald.db-wal")
            with wal:
                # Once idle, the WAL is truncated: then the disk is filled to the last byte.
                deadline = time.monotonic() + IDLE_WAIT
                while wal.size() and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert wal.size() == 0
                fill(tmpfs / "filler")
                for i in range(20):
                    r = post(f"full-{i}")
                    assert r.status_code == 503, r.text
                    assert r.json()["error"]["code"] == "serviceNotAvailable"
                    assert int(r.headers["Retry-After"]) > 0
                    refused.append(f"full-{i}")
                ready = c.get("/readyz")
                assert ready.status_code == 503, ready.text
                assert "disk is full" in ready.json()["reason"]
                assert c.get("/healthz").status_code == 200  # alive, only not ready
                # Still not ready after the push queue's claims (each second) have committed:
                # a commit that writes nothing proves nothing.
                time.sleep(2.5)
                assert c.get("/readyz").status_code == 503

                (tmpfs / "filler").unlink()
                freed = free(tmpfs)
                deadline = time.monotonic() + 10
                while c.get("/readyz").status_code != 200:
                    assert time.monotonic() < deadline, "not ready after space was freed"
                    time.sleep(0.1)
                for i in range(300):  # writes succeed again, and the WAL stays bounded
                    assert post(f"after-{i}").status_code == 201
            assert wal.largest <= MIB + SLACK, f"WAL reached {wal.largest} bytes"
            # The freed space was not taken back by the WAL: what is gone is what the 300 posts
            # added to the database (about 5 KB each), and at most one WAL.
            assert freed - free(tmpfs) <= 300 * 8 * 1024 + MIB + SLACK

            found: dict[str, str] = {}
            url: str | None = "/beta/me/notifications?$top=999"
            while url:
                page = c.get(url)
                assert page.status_code == 200
                found |= {n["appNotificationId"]: n["id"] for n in page.json()["value"]}
                url = page.json().get("@odata.nextLink")
        assert {k: found.get(k) for k in acked} == acked, "acknowledged notifications lost"
        assert not set(refused) & set(found), "a refused write was stored"
    finally:
        stop(proc)
