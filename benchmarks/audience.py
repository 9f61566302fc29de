"""Audience benchmark: 100,000 recipients reached by one send, against the same recipients
posted one by one, in the same run, on the same server (docs/performance.md "Audiences").

For each store (sqlite, postgres) one `herald serve` process is started, then:

1. one by one: `wrk` (audience.lua, 64 connections) posts one notification to each recipient
   (`POST /beta/users/{id}/notifications`, app-only token);
2. one send: the recipients are put in an audience (addMembers, 10,000 at a time, not timed),
   then `POST /beta/notificationAudiences/{id}/sendNotification` and its operation is polled.

Each phase is timed from its first request until every notification is committed *and* fanned
out (the outbox is empty: the dispatcher has published every change to the live streams), and
gives recipients per second. During each phase another user's device (a WebSocket stream)
receives that user's own posts, one at a time; their latency (before the POST until the stream
message) is reported as p50/p99. The load of the machine (other processes' CPU) is printed too:
on a shared machine compare the ratio, not the absolute figures.

Usage: .venv/bin/python benchmarks/audience.py [--recipients 100000] [--targets sqlite,postgres]
       [--postgres-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.ingest import (
    HOST,
    HOST_NAME,
    Store,
    free_port,
    herald_bin,
    pg,
    postgres_url,
    register_app,
    server_env,
    system_busy_seconds,
    tree_cpu_seconds,
    wait_ready,
    with_search_path,
)

from tests.devices import api, open_stream, subscription_body

LUA = Path(__file__).resolve().parent / "audience.lua"
CONNECTIONS = 64
THREADS = 2
CHUNK = 10_000  # members added per request
STALL = 1.0  # seconds without a new row while wrk runs: it has nothing left to send
PREFIX = "r-"  # the recipients' user ids
# (Store.count's table: the recipients' notifications, not those of the other user.)
RECIPIENT_ROWS = f"notifications WHERE user_id LIKE '{PREFIX}%'"


def log(msg: str) -> None:
    print(f"[audience] {msg}", file=sys.stderr, flush=True)


def body(expiration: str) -> dict[str, Any]:
    return {
        "targetHostName": HOST_NAME,
        "groupName": "sale",
        "payload": {"visualContent": {"title": "Spring sale", "body": "20% off until Sunday."}},
        "expirationDateTime": expiration,
    }


class Probe:
    """Another user's device: posts to that user one at a time and times each until its stream
    message arrives, while `running` is set."""

    def __init__(self, base: str, app_token: str, user_token: str, user: str) -> None:
        self.base, self.app_token, self.user_token, self.user = base, app_token, user_token, user
        self.latencies: list[float] = []

    async def run(self, stop: asyncio.Event) -> None:
        async with api(self.base, self.user_token) as me, api(self.base, self.app_token) as srv:
            r = await me.post(
                "/beta/me/notificationSubscriptions", json=subscription_body(HOST_NAME)
            )
            r.raise_for_status()
            async with open_stream("ws", self.base, r.json()["id"], self.user_token) as stream:
                await stream.ready()
                expiration = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
                while not stop.is_set():
                    start = time.perf_counter()
                    posted = await srv.post(
                        f"/beta/users/{self.user}/notifications", json=body(expiration)
                    )
                    posted.raise_for_status()
                    await stream.next()
                    self.latencies.append(time.perf_counter() - start)
                    await asyncio.sleep(0.01)

    def summary(self) -> dict[str, float | int]:
        xs = sorted(self.latencies)
        if not xs:
            return {"samples": 0}
        return {
            "samples": len(xs),
            "p50_ms": round(xs[len(xs) // 2] * 1000, 1),
            "p99_ms": round(xs[min(len(xs) - 1, int(len(xs) * 0.99))] * 1000, 1),
            "max_ms": round(xs[-1] * 1000, 1),
        }


def recipients_with(store: Store) -> set[str]:
    """The recipients that have a notification."""
    sql = f"SELECT DISTINCT user_id FROM {RECIPIENT_ROWS}"
    if store.sqlite_path is not None:
        conn = sqlite3.connect(f"file:{store.sqlite_path}?mode=ro", uri=True, timeout=30)
        try:
            return {r[0] for r in conn.execute(sql)}
        finally:
            conn.close()
    assert store.pg_url is not None
    return set(
        str(pg(store.pg_url, f"SELECT string_agg(user_id, ',') FROM ({sql}) u") or "").split(",")
    )


async def drained(store: Store, expected: int) -> None:
    """Until the store holds `expected` notifications and its outbox is empty."""
    said = time.monotonic()
    while True:
        rows = await asyncio.to_thread(store.count, RECIPIENT_ROWS)
        outbox = await asyncio.to_thread(store.count, "outbox")
        if rows >= expected and outbox == 0:
            return
        if time.monotonic() - said > 5:
            log(f"{rows} of {expected} notifications, {outbox} in the outbox")
            said = time.monotonic()
        await asyncio.sleep(0.05)


async def phase(
    name: str, work: Any, store: Store, expected: int, probe: Probe, server_pid: int
) -> dict[str, Any]:
    stop = asyncio.Event()
    probing = asyncio.create_task(probe.run(stop))
    await asyncio.sleep(0.5)  # the device is connected
    probe.latencies.clear()
    busy0, cpu0 = system_busy_seconds(), tree_cpu_seconds(server_pid)
    start = time.perf_counter()
    idle = await work()
    await drained(store, expected)
    elapsed = time.perf_counter() - start - (idle or 0.0)
    busy, cpu = system_busy_seconds() - busy0, tree_cpu_seconds(server_pid) - cpu0
    stop.set()
    await probing
    return {
        "phase": name,
        "seconds": round(elapsed, 2),
        "machine_busy_cores": round(busy / elapsed, 2),
        "herald_cpu_cores": round(cpu / elapsed, 2),
        "other_user": probe.summary(),
    }


def bench(target: str, args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    data = work_dir / target
    data.mkdir()
    env = server_env()
    store_url = None
    store = Store(sqlite_path=data / "herald.db")
    if target == "postgres":
        admin = postgres_url(args)
        schema = f"bench_aud_{uuid.uuid4().hex[:8]}"
        pg(admin, f"CREATE SCHEMA {schema}")
        store_url = with_search_path(admin, schema)
        store = Store(pg_url=store_url)
    client_id = register_app(data, store_url, env)
    port = free_port()
    argv = [herald_bin(), "serve", "--data", str(data), "--port", str(port)]
    argv += ["--store", store_url] if store_url else []
    log_file = data / "server.log"
    with log_file.open("ab") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=out, start_new_session=True)
    try:
        wait_ready(proc, port, "/readyz", log_file)
        return asyncio.run(measure(target, args, data, port, client_id, store, proc.pid))
    finally:
        proc.terminate()
        proc.wait(30)
        if target == "postgres":
            pg(postgres_url(args), f"DROP SCHEMA {schema} CASCADE")


def tokens(data: Path, port: int, client_id: str, user: str) -> tuple[str, str]:
    from herald.auth.issuer import LocalIssuer
    from herald.settings import load

    settings = load({"data": str(data), "port": port}, env=server_env()).settings
    issuer = LocalIssuer.load_or_create(settings.data, settings.issuer_url, settings.audience)
    return (
        issuer.mint(client_id=client_id, user_id=None, ttl_seconds=3 * 3600),
        issuer.mint(client_id=client_id, user_id=user, ttl_seconds=3 * 3600),
    )


async def measure(
    target: str,
    args: argparse.Namespace,
    data: Path,
    port: int,
    client_id: str,
    store: Store,
    pid: int,
) -> dict[str, Any]:
    n = args.recipients
    base = f"http://{HOST}:{port}"
    other = f"other-{uuid.uuid4().hex[:8]}"
    app_token, user_token = tokens(data, port, client_id, other)
    probe = Probe(base, app_token, user_token, other)
    prefix = PREFIX
    expiration = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%S.000Z")

    auth = {"Authorization": f"Bearer {app_token}"}
    topped_up: list[str] = []

    async def one_by_one() -> float:
        argv = [args.wrk, f"-t{THREADS}", f"-c{CONNECTIONS}", "-d3600s", "--timeout", "10s"]
        argv += ["-s", str(LUA), base, "--", app_token, HOST_NAME, prefix, str(n)]
        argv += [str(THREADS), expiration]
        done = await asyncio.create_subprocess_exec(
            *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        # wrk runs for its duration whatever its threads do: once every recipient's post has
        # committed, SIGINT makes it stop and print its summary.
        last, still = -1, time.monotonic()
        while (rows := await asyncio.to_thread(store.count, RECIPIENT_ROWS)) < n:
            if rows != last:
                last, still = rows, time.monotonic()
            elif time.monotonic() - still > STALL or done.returncode is not None:
                break  # no post in flight any more (or wrk failed: its summary says why)
            await asyncio.sleep(0.05)
        done.send_signal(signal.SIGINT)
        out, err = await done.communicate()
        line = next(x for x in out.decode().splitlines() if x.startswith("WRKJSON "))
        counts = json.loads(line.removeprefix("WRKJSON "))
        if counts["other"]:
            raise RuntimeError(f"wrk: {counts}\n{out.decode()}\n{err.decode()}")
        # wrk drops a generated request now and then (a connection it re-opens asks the
        # script for a new one): post the few it skipped, within the timed phase.
        have = await asyncio.to_thread(recipients_with, store)
        missing = [f"{prefix}{i}" for i in range(n) if f"{prefix}{i}" not in have]
        topped_up.extend(missing)
        async with httpx.AsyncClient(base_url=base, headers=auth, timeout=30) as c:
            for user in missing:
                r = await c.post(f"/beta/users/{user}/notifications", json=body(expiration))
                r.raise_for_status()
        # The wait that found wrk idle is not part of the figure.
        return STALL if missing else 0.0

    first = await phase("one by one", one_by_one, store, n, probe, pid)
    log(f"{target}: one by one {first} ({len(topped_up)} posted after wrk)")

    audience = f"bench-{uuid.uuid4().hex[:6]}"
    headers = {"Authorization": f"Bearer {app_token}"}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=120) as c:
        (await c.post("/beta/notificationAudiences", json={"id": audience})).raise_for_status()
        for start in range(0, n, CHUNK):
            ids = [f"{prefix}{i}" for i in range(start, min(n, start + CHUNK))]
            r = await c.post(
                f"/beta/notificationAudiences/{audience}/addMembers", json={"userIds": ids}
            )
            r.raise_for_status()
        op: dict[str, Any] = {}

        async def send() -> None:
            t0 = time.perf_counter()
            r = await c.post(
                f"/beta/notificationAudiences/{audience}/sendNotification",
                json={"notification": body(expiration)},
            )
            r.raise_for_status()
            accepted = time.perf_counter()
            while True:
                op.update((await c.get(r.headers["location"])).json())
                if op["status"] in ("succeeded", "failed"):
                    break
                await asyncio.sleep(0.1)
            op["accepted_ms"] = round((accepted - t0) * 1000, 1)

        second = await phase("one send", send, store, 2 * n, probe, pid)
    log(f"{target}: one send {second} (operation {op.get('status')}, {op.get('succeededCount')})")
    ratio = first["seconds"] / second["seconds"]
    return {
        "target": target,
        "recipients": n,
        "one_by_one": first | {"recipients_per_s": round(n / first["seconds"])},
        "one_send": second
        | {"recipients_per_s": round(n / second["seconds"]), "accepted_ms": op["accepted_ms"]},
        "send_vs_one_by_one": round(ratio, 2),
        "load_average": os.getloadavg(),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--recipients", type=int, default=100_000)
    p.add_argument("--targets", default="sqlite,postgres")
    p.add_argument("--postgres-url", default=os.environ.get("HERALD_TEST_POSTGRES_URL"))
    p.add_argument("--wrk", default="wrk")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="herald-audience-") as work:
        for target in args.targets.split(","):
            results.append(bench(target, args, Path(work)))
    for r in results:
        a, b = r["one_by_one"], r["one_send"]
        print(
            f"{r['target']:8} {r['recipients']} recipients: one by one {a['recipients_per_s']}/s"
            f" ({a['seconds']} s), one send {b['recipients_per_s']}/s ({b['seconds']} s,"
            f" 202 in {b['accepted_ms']} ms): x{r['send_vs_one_by_one']};"
            f" other user's posts p99 {a['other_user'].get('p99_ms')} ms during one by one,"
            f" {b['other_user'].get('p99_ms')} ms during the send"
            f" (machine busy {a['machine_busy_cores']}/{b['machine_busy_cores']} cores,"
            f" load {r['load_average'][0]:.1f})"
        )
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
