"""Which Redis pub/sub channels the Redis broker uses: a few shared shard channels that every node
subscribes to, or one channel per user that a node subscribes to while it has a listener for
the user. Both measured in one run on a private redis-server, so the ratios hold on a shared
machine even where the absolute figures do not.

One subscribing node (a separate process, as a Herald node is) has listeners for half of
`--users` users; one publisher sends `--messages` changes (a real `Change` in the broker's
envelope, about 600 bytes) to random users, pipelined as the broker's writer does. Reported per
published message: the subscriber's CPU (reading, decoding the envelope header, dropping users
it does not serve), Redis's CPU, and for per-user channels the time to subscribe the node's
users and one SUBSCRIBE's round trip (what a stream's start would wait for, or lose to a gap).

Usage: .venv/bin/python benchmarks/redis_channels.py [--users 10000] [--messages 50000]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import random
import sys
import time
import zlib
from datetime import UTC, datetime
from pathlib import Path

import msgspec
from redis.asyncio import Redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from herald.broker.redis import Envelope, _encoder
from herald.model import (
    Change,
    ChangeKind,
    Notification,
    Payload,
    Priority,
    TargetPolicy,
    VisualContent,
)
from tests.redis import redis_server

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# The layout measured here against per-user channels: 64 shard channels, one change a message
# (the Redis broker has since moved to one channel of batched messages; docs/architecture.md).
SHARDS = 64
_envelopes = msgspec.msgpack.Decoder(Envelope)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def message(user: str, position: int) -> bytes:
    at = datetime.now(UTC)
    notification = Notification(
        id=f"{user}-{position}",
        user_id=user,
        app="app.example.com",
        app_notification_id=f"a{position}",
        target_host_name="app.example.com",
        group_name=None,
        payload=Payload(visual_content=VisualContent(title="A title", body="x" * 200)),
        target_policy=TargetPolicy(),
        priority=Priority.NONE,
        display_time_to_live=None,
        expiration_date_time=at,
        fallback_policy=None,
        created_date_time=at,
        last_modified_date_time=at,
    )
    change = Change(
        user_id=user,
        position=position,
        kind=ChangeKind.CREATED,
        app="app.example.com",
        notification_id=notification.id,
        at=at,
        notification=notification,
    )
    raw = msgspec.Raw(_encoder.encode(change))
    return _encoder.encode(Envelope("publisher", "c", user, change.app, "", raw))


def subscriber(
    url: str, channels: list[bytes], local: set[str], expected: int, out: mp.Queue
) -> None:  # type: ignore[type-arg]
    async def run() -> None:
        client = Redis.from_url(url)
        pubsub = client.pubsub()
        begun = time.perf_counter()
        for start in range(0, len(channels), 1000):
            await pubsub.subscribe(*channels[start : start + 1000])
        confirmed = 0
        while confirmed < len(channels):
            m = await pubsub.get_message(timeout=10)
            if m is not None and m["type"] == "subscribe":
                confirmed += 1
        subscribed = time.perf_counter() - begun
        # One more channel: a SUBSCRIBE's round trip, as a new stream's first listen.
        begun = time.perf_counter()
        await pubsub.subscribe(b"herald:probe")
        while (m := await pubsub.get_message(timeout=10)) is None or m["type"] != "subscribe":
            pass
        round_trip = time.perf_counter() - begun
        out.put(("ready", subscribed, round_trip))
        taken = seen = 0
        cpu = time.process_time()
        while seen < expected:
            m = await pubsub.get_message(timeout=10)
            if m is None:
                break
            if m["type"] != "message":
                continue
            seen += 1
            envelope = _envelopes.decode(m["data"])
            if envelope.user in local:
                msgspec.msgpack.decode(envelope.change, type=Change)
                taken += 1
        out.put(("done", seen, taken, time.process_time() - cpu))
        await pubsub.aclose()
        await client.aclose()

    asyncio.run(run())


async def publish(url: str, items: list[tuple[bytes, bytes]]) -> float:
    client = Redis.from_url(url)
    begun = time.perf_counter()
    for start in range(0, len(items), 1000):
        pipe = client.pipeline(transaction=False)
        for channel, data in items[start : start + 1000]:
            pipe.publish(channel, data)
        await pipe.execute()
    took = time.perf_counter() - begun
    await client.aclose()
    return took


def scenario(name: str, url: str, redis_pid: int, users: list[str], messages: int) -> None:
    rng = random.Random(14)
    local = set(users[: len(users) // 2])
    if name == "sharded":
        channels = [f"herald:c:{s}".encode() for s in range(SHARDS)]

        def channel(user: str) -> bytes:
            return channels[zlib.crc32(user.encode()) % SHARDS]

        expected = messages
    else:
        channels = [f"herald:u:{u}".encode() for u in sorted(local)]

        def channel(user: str) -> bytes:
            return f"herald:u:{user}".encode()

        expected = -1  # counted below
    targets = [rng.choice(users) for _ in range(messages)]
    if expected < 0:
        expected = sum(1 for u in targets if u in local)
    items = [(channel(u), message(u, i)) for i, u in enumerate(targets)]
    out: mp.Queue = mp.Queue()  # type: ignore[type-arg]
    proc = mp.Process(target=subscriber, args=(url, channels, local, expected, out))
    proc.start()
    _, subscribed, round_trip = out.get(timeout=120)
    redis_before = cpu_seconds(redis_pid)
    took = asyncio.run(publish(url, items))
    _, seen, taken, sub_cpu = out.get(timeout=120)
    redis_cpu = cpu_seconds(redis_pid) - redis_before
    proc.join(30)
    print(
        f"{name:9} channels {len(channels):5}  subscribe all {subscribed * 1000:7.1f} ms"
        f"  one SUBSCRIBE {round_trip * 1e6:6.0f} us  received {seen:6} (kept {taken:6})"
        f"  per published message: node CPU {sub_cpu / messages * 1e6:5.1f} us,"
        f" Redis CPU {redis_cpu / messages * 1e6:5.1f} us,"
        f" publish wall {took / messages * 1e6:5.1f} us"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--messages", type=int, default=50_000)
    args = parser.parse_args()
    users = [f"user-{i:06}" for i in range(args.users)]
    servers = redis_server()
    server = next(servers)
    try:
        assert server.proc is not None
        print(f"{args.users} users, the node serves half; {args.messages} changes to random users")
        for name in ("sharded", "per-user", "sharded", "per-user"):
            scenario(name, server.url, server.proc.pid, users, args.messages)
    finally:
        servers.close()


if __name__ == "__main__":
    main()
