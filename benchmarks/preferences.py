"""What notification preferences cost the dispatcher (docs/push.md, "Preferences and quiet
hours"): the read of a batch's push targets, which now carries the pairs' preferences, against
the read it replaced, in the same run, on the same database, interleaved.

    push_targets    the read the dispatcher made before (`Outbox.push_targets`)
    push_audience   the read it makes now (`Preferences.push_audience`: the same rows, LEFT JOIN
                    notification_preferences on its primary key)

Run with no preferences stored (every user as today) and with `--with-preferences` of the users
having some (quiet hours, a muted group). Also: the per-push cost of `verdict` for a user with
quiet hours, in the process.

Usage: .venv/bin/python benchmarks/preferences.py [--users 20000] [--batch 512] [--rounds 200]
       [--with-preferences 0.1] [--store sqlite|postgres] [--postgres-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from datetime import time as clock_time
from functools import partial

from herald.model import (
    DevicePlatform,
    Message,
    PushKind,
    Subscription,
    WebPushChannel,
    WebPushKeys,
)
from herald.preferences import NotificationPreferences, QuietHours, quiet_period_end, verdict
from herald.store import Store
from herald.store.postgres import PostgresStore
from herald.store.sqlite import SqliteStore

APP = "bench.example.com"
NOW = datetime.now(UTC)


def subscription(user: str, n: int) -> Subscription:
    channel = WebPushChannel(
        endpoint=f"https://push.example.net/{user}/{n}", keys=WebPushKeys(p256dh="p", auth="a")
    )
    return Subscription(
        id=str(uuid.uuid4()),
        user_id=user,
        app=APP,
        platform=DevicePlatform.WEBPUSH,
        display_name=None,
        push_channel=channel,
        expiration_date_time=NOW + timedelta(days=30),
        created_date_time=NOW,
        last_modified_date_time=NOW,
    )


PREFS = NotificationPreferences(
    muted_groups=("promotions",),
    quiet_hours=QuietHours(
        time_zone="Europe/Berlin", start=clock_time(22), end=clock_time(7), allow_high_priority=True
    ),
)


async def fill(store: Store, users: list[str], share: float) -> None:
    for i in range(0, len(users), 500):
        await asyncio.gather(
            *(store.add_subscription(subscription(u, 0), 10, NOW) for u in users[i : i + 500])
        )
    chosen = users[: int(len(users) * share)]
    for i in range(0, len(chosen), 500):
        await asyncio.gather(
            *(store.put_preferences(u, APP, PREFS, None, NOW) for u in chosen[i : i + 500])
        )


async def timed(call: Callable[[], Awaitable[object]]) -> float:
    start = time.perf_counter()
    await call()
    return time.perf_counter() - start


async def measure(store: Store, users: list[str], batch: int, rounds: int) -> dict[str, float]:
    """Median seconds per batch read of each, interleaved (same load on the machine)."""
    old: list[float] = []
    new: list[float] = []
    for _ in range(rounds):
        pairs: Sequence[tuple[str, str]] = [(u, APP) for u in random.sample(users, batch)]
        calls = {
            "old": partial(store.push_targets, pairs, NOW),
            "new": partial(store.push_audience, pairs, NOW),
        }
        for which in random.sample(["old", "new"], 2):
            (old if which == "old" else new).append(await timed(calls[which]))
    return {"push_targets": statistics.median(old), "push_audience": statistics.median(new)}


def verdict_cost(n: int = 200_000) -> tuple[float, float]:
    """Seconds per `quiet_period_end` (once per user and dispatch batch) and per `verdict` (once
    per alerting push)."""
    message = Message(
        kind=PushKind.ALERT, notification_id="n", app_notification_id="a", position=1, expires=NOW
    )
    start = time.perf_counter()
    for _ in range(n):
        end = quiet_period_end(PREFS, NOW)
    per_user = (time.perf_counter() - start) / n
    start = time.perf_counter()
    for _ in range(n):
        verdict(PREFS, message, DevicePlatform.WEBPUSH, end)
    return per_user, (time.perf_counter() - start) / n


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store: Store
        if args.store == "sqlite":
            store = SqliteStore(f"sqlite:///{tmp}/bench.db")
        else:
            schema = f"bench_{uuid.uuid4().hex[:10]}"
            import asyncpg

            admin = await asyncpg.connect(args.postgres_url)
            await admin.execute(f"CREATE SCHEMA {schema}")
            store = PostgresStore(args.postgres_url, server_settings={"search_path": schema})
        await store.open()
        try:
            users = [f"user-{i}" for i in range(args.users)]
            await fill(store, users, args.with_preferences)
            got = await measure(store, users, args.batch, args.rounds)
        finally:
            await store.close()
            if args.store == "postgres":
                await admin.execute(f"DROP SCHEMA {schema} CASCADE")
                await admin.close()
    ratio = got["push_audience"] / got["push_targets"]
    print(
        f"store={args.store} users={args.users} batch={args.batch} rounds={args.rounds}"
        f" with_preferences={args.with_preferences:.0%}"
    )
    print(f"  push_targets  (before): {got['push_targets'] * 1e3:8.3f} ms per batch (median)")
    print(f"  push_audience (now):    {got['push_audience'] * 1e3:8.3f} ms per batch (median)")
    print(f"  ratio now/before: {ratio:.3f}")
    per_user, per_push = verdict_cost()
    print(f"  quiet_period_end per user with quiet hours and batch: {per_user * 1e6:.2f} µs")
    print(f"  verdict per alerting push of a user with preferences: {per_push * 1e6:.2f} µs")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--users", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=512, help="pairs per read (the dispatch batch)")
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--with-preferences", type=float, default=0.0, help="share of users (0)")
    ap.add_argument("--store", choices=["sqlite", "postgres"], default="sqlite")
    ap.add_argument("--postgres-url", default="postgresql://herald:herald@127.0.0.1:5432/herald")
    return ap.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
