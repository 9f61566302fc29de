"""The Redis broker's gap filling, against a real redis-server and a real PostgreSQL change log.

Two nodes (A and B), each with its own store on one database and its own broker on one
redis-server. Changes are committed on A (`Store.put`) and published by A's real dispatcher;
devices listen on B. Whatever Redis loses (a message, a connection, the server for a while, a
frozen server that stays connected), each device on B must end with exactly the user's
positions, in order, once: what delta returns. The figures (time to full delivery after the
fault ends, the worst delay of a change) are printed; run with `-s` to see them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from herald.broker.redis import RedisBroker
from herald.metrics import Metrics
from herald.model import Change
from herald.outbound.dispatcher import Dispatcher
from herald.store import Store
from herald.store.postgres import PostgresStore
from tests.pg import postgres_url
from tests.redis import RedisServer
from tests.store.support import APP, OTHER_APP, T0, content, new_id

pytestmark = pytest.mark.postgres

USERS = [f"user{i}" for i in range(5)]


class Device:
    """A listener on node B: what it got and when (monotonic), and its position."""

    def __init__(self, sent: int = 0) -> None:
        self.sent = sent
        self.changes: list[Change] = []
        self.arrived: dict[int, float] = {}

    def deliver(self, change: Change) -> None:
        self.changes.append(change)
        self.arrived.setdefault(change.position, time.monotonic())

    def revoke(self, subscription_id: str) -> None:
        pass

    @property
    def positions(self) -> list[int]:
        return [c.position for c in self.changes]


@dataclass
class Nodes:
    redis: RedisServer
    a: Store
    b: Store
    broker_a: RedisBroker
    broker_b: RedisBroker
    committed: dict[int, float] = field(default_factory=dict)  # position of USERS[0] -> when

    async def post(self, user: str, app: str = APP) -> int:
        """Commit one change on A; its position."""
        notification, _ = await self.a.put(user, app, content(), new_id(), T0)
        changes = await self.a.changes(user, None, 0, 100_000)
        position = max(c.position for c in changes if c.notification_id == notification.id)
        if user == USERS[0]:
            self.committed[position] = time.monotonic()
        return position


@pytest.fixture
async def schema() -> AsyncIterator[Callable[[], Store]]:
    import asyncpg

    url = postgres_url()
    name = f"test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(url)
    try:
        await admin.execute(f"CREATE SCHEMA {name}")
        yield lambda: PostgresStore(url, min_size=1, server_settings={"search_path": name})
    finally:
        await admin.execute(f"DROP SCHEMA {name} CASCADE")
        await admin.close()


@contextlib.asynccontextmanager
async def nodes(
    redis: RedisServer, make: Callable[[], Store], dispatch: bool = True, **intervals: float
) -> AsyncIterator[Nodes]:
    """Nodes A and B; A runs a dispatcher unless `dispatch` is False (changes are then
    published by hand, or not at all)."""
    a, b = make(), make()
    await a.open()
    await b.open()
    broker_a, broker_b = (
        RedisBroker(redis.url, a, **intervals),
        RedisBroker(redis.url, b, **intervals),
    )
    await broker_a.start()
    await broker_b.start()
    dispatcher = Dispatcher(a, broker_a, Metrics(), poll=0.1)
    if dispatch:
        await dispatcher.start()
    try:
        yield Nodes(redis, a, b, broker_a, broker_b)
    finally:
        await dispatcher.close()
        await broker_a.close()
        await broker_b.close()
        await a.close()
        await b.close()


async def until(condition: Callable[[], bool], what: str, limit: float = 15.0) -> float:
    """Wait for `condition`; how long it took."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < limit, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)
    return time.monotonic() - start


async def equal_to_delta(n: Nodes, devices: dict[str, Device], app: str = APP) -> None:
    """Each device has exactly its user's changes of `app`, in order, once: what delta reads."""
    for user, device in devices.items():
        logged = [c.position for c in await n.b.changes(user, app, 0, 100_000)]
        assert device.positions == logged, user
        assert device.positions == sorted(set(device.positions))


async def complete(n: Nodes, devices: dict[str, Device], limit: float = 15.0) -> float:
    """Wait until every device has its user's newest change; how long that took."""
    heads = await n.a.heads(list(devices))
    return await until(
        lambda: all(heads[u] in d.positions for u, d in devices.items()), "full delivery", limit
    )


def listen(n: Nodes) -> dict[str, Device]:
    devices = {user: Device() for user in USERS}
    for user, device in devices.items():
        n.broker_b.listen(user, APP, device)
    return devices


async def posting(n: Nodes, rate: float, stop: asyncio.Event) -> int:
    """Commit changes round-robin over USERS at about `rate` per second until `stop`."""
    count = 0
    while not stop.is_set():
        await n.post(USERS[count % len(USERS)])
        count += 1
        await asyncio.sleep(1 / rate)
    return count


def worst_delay(n: Nodes, device: Device, since: float = 0.0) -> float:
    """The longest a change of USERS[0] committed after `since` took to reach the device."""
    delays = [
        device.arrived[p] - t for p, t in n.committed.items() if t >= since and p in device.arrived
    ]
    return max(delays, default=0.0)


# -- gaps -------------------------------------------------------------------------------------


async def test_a_lost_message_is_filled_from_the_log_in_order(
    redis_service: RedisServer, schema: Callable[[], Store]
) -> None:
    """Changes are published by hand (no dispatcher): number 15 never is. The next one shows
    the gap, and the device still gets every change, in order, once."""
    async with nodes(redis_service, schema, dispatch=False) as n:
        device = Device()
        n.broker_b.listen("lonely", APP, device)
        for _ in range(20):
            await n.post("lonely")
        changes = await n.a.changes("lonely", APP, 0, 100)
        assert [c.position for c in changes] == list(range(1, 21))
        start = time.monotonic()
        for change in changes:
            if change.position != 15:
                await n.broker_a.publish(change)
        await until(lambda: 20 in device.positions, "the last change")
        took = time.monotonic() - start
        assert device.positions == list(range(1, 21))
        assert n.broker_b.cursors.filled >= 1
        print(f"\nlost message: filled, all 20 in order within {took * 1000:.0f} ms")


async def test_a_lost_tail_is_found_by_reconciling(
    redis_service: RedisServer, schema: Callable[[], Store]
) -> None:
    """The last change of a user is never published: no later change shows the gap, so the
    periodic comparison with the newest positions finds it."""
    async with nodes(redis_service, schema, dispatch=False, reconcile=1.0) as n:
        device = Device()
        n.broker_b.listen("quiet", APP, device)
        await n.post("quiet")
        (first,) = await n.a.changes("quiet", None, 0, 10)
        await n.broker_a.publish(first)
        await until(lambda: device.positions == [1], "the first change")
        # Committed, never published by anyone (no dispatcher runs).
        notification, _ = await n.a.put("quiet", APP, content(), new_id(), T0)
        took = await until(lambda: len(device.positions) == 2, "the unpublished change", 5.0)
        assert device.changes[1].notification_id == notification.id
        print(f"\nlost tail: found by reconciling within {took * 1000:.0f} ms (interval 1 s)")


async def test_a_head_that_jumps_is_caught_up_with_once_and_the_next_change_flows(
    redis_service: RedisServer, schema: Callable[[], Store]
) -> None:
    """On a new history (a lossy failover, store/postgres/epoch.py) every head jumps past
    positions that will never exist. Reconciling reads the log once, finds nothing, and takes the
    head as reached: not a gap read again at every reconcile, nor one the next change waits on."""
    async with nodes(redis_service, schema, dispatch=False, reconcile=3600.0) as n:
        device = Device()
        n.broker_b.listen("jumper", APP, device)
        first = await n.post("jumper")
        (change,) = await n.a.changes("jumper", None, 0, 10)
        await n.broker_a.publish(change)
        await until(lambda: device.positions == [first], "the first change")
        assert isinstance(n.a, PostgresStore)
        async with n.a._acquire() as conn:  # what the epoch's move does to this user's head
            await conn.execute("UPDATE feed_heads SET position = position + 1000000")
        assert await n.broker_b.cursors.reconcile() == 1  # behind: the head moved
        await until(lambda: n.broker_b.cursors.users["jumper"].filler is None, "the fill")
        reads = n.broker_b.cursors.gaps
        assert await n.broker_b.cursors.reconcile() == 0  # caught up: no read of the log again
        await asyncio.sleep(0.1)
        assert n.broker_b.cursors.gaps == reads
        # The next change is the one after the head: delivered as it comes, no fill.
        nxt = await n.post("jumper")
        assert nxt == first + 1_000_001
        (change,) = await n.a.changes("jumper", None, first, 10)
        await n.broker_a.publish(change)
        await until(lambda: device.positions == [first, nxt], "the change after the jump", 1.0)
        assert n.broker_b.cursors.gaps == reads


async def test_changes_of_other_apps_are_not_gaps_and_a_resume_position_is_kept(
    redis_service: RedisServer, schema: Callable[[], Store]
) -> None:
    """Positions are per user across apps: a device of one app sees the others' positions
    skipped, not missing; one that resumes from position 3 gets only what follows."""
    async with nodes(redis_service, schema) as n:
        for _ in range(3):
            await n.post("mixed")
        other, resumed = Device(), Device(sent=3)
        n.broker_b.listen("mixed", OTHER_APP, other)
        n.broker_b.listen("mixed", APP, resumed)
        for i in range(12):
            await n.post("mixed", OTHER_APP if i % 3 else APP)
        await complete(n, {"mixed": other})
        await until(lambda: 13 in resumed.positions, "the app's last change")
        await equal_to_delta(n, {"mixed": other}, OTHER_APP)
        assert resumed.positions == [4, 7, 10, 13]
        assert other.positions == [5, 6, 8, 9, 11, 12, 14, 15]


async def test_two_publishers_of_the_same_changes_deliver_each_once(
    redis_service: RedisServer, schema: Callable[[], Store]
) -> None:
    """Two nodes may publish the same outbox entries (both dispatch): devices get each once."""
    async with nodes(redis_service, schema) as n:
        devices = listen(n)
        for i in range(50):
            await n.post(USERS[i % len(USERS)])
        changes = [c for u in USERS for c in await n.a.changes(u, None, 0, 100)]
        await complete(n, devices)
        for change in changes:  # all of them again, from B this time
            await n.broker_a.publish(change)
            await n.broker_b.publish(change)
        await n.post(USERS[0])  # a marker, published after the repeats
        await complete(n, devices)
        await equal_to_delta(n, devices)


async def test_changes_published_together_travel_as_one_batch(
    redis_service: RedisServer, schema: Callable[[], Store]
) -> None:
    """What a dispatcher publishes in one go (one batch of the outbox) goes to Redis as a few
    messages, not one each, and still reaches the other node's devices each once, in order."""
    from redis.asyncio import Redis

    async with nodes(redis_service, schema, dispatch=False) as n:
        devices = listen(n)
        for i in range(100):
            await n.post(USERS[i % len(USERS)])
        changes = sorted(
            [c for u in USERS for c in await n.a.changes(u, None, 0, 1000)],
            key=lambda c: (c.at, c.position),
        )
        client = Redis.from_url(redis_service.url)
        try:

            async def publishes() -> int:
                stats = await client.info("commandstats")
                return int(stats.get("cmdstat_publish", {}).get("calls", 0))

            before = await publishes()
            for change in changes:
                await n.broker_a.publish(change)
            await complete(n, devices)
            sent = await publishes() - before
        finally:
            await client.aclose()
        await equal_to_delta(n, devices)
        # 100 changes; the rest are the two nodes' heartbeats (one each per 0.5 s).
        assert sent < 20, f"{sent} PUBLISHes for 100 changes"


# -- Redis failures under publishing ---------------------------------------------------------


async def fault(
    n: Nodes, what: Callable[[], None], undo: Callable[[], None], hold: float, bound: float
) -> str:
    """Publish at 200/s; after 1 s apply the fault for `hold` seconds, undo it; publish 1 s more.
    Every device then equals delta, and no change took longer than `bound` seconds (the stated
    bound, with a margin for this shared machine). Returns the figures."""
    devices = listen(n)
    stop = asyncio.Event()
    writer = asyncio.create_task(posting(n, 200, stop))
    try:
        await asyncio.sleep(1.0)
        begun = time.monotonic()
        what()
        await asyncio.sleep(hold)
        during = worst_delay(n, devices[USERS[0]], begun)
        undo()
        ended = time.monotonic()
        await asyncio.sleep(1.0)
    finally:
        stop.set()
        count = await writer
    took = await complete(n, devices)
    await equal_to_delta(n, devices)
    device = devices[USERS[0]]
    # Everything committed before the fault ended had arrived this long after it ended.
    backlog = max(device.arrived[p] for p, t in n.committed.items() if t <= ended) - ended
    after = worst_delay(n, device, ended)
    assert max(during, after, worst_delay(n, device)) < bound
    return (
        f"{count} changes, 0 missing/duplicate/reordered; worst delay of a change committed"
        f" during the fault {during * 1000:.0f} ms, after it {after * 1000:.0f} ms; the fault's"
        f" backlog delivered {max(0.0, backlog) * 1000:.0f} ms after it ended; all delivered"
        f" {took * 1000:.0f} ms after publishing stopped"
    )


async def test_redis_killed_for_five_seconds_under_publishing(
    redis_service: RedisServer, schema: Callable[[], Store]
) -> None:
    async with nodes(redis_service, schema) as n:
        before = n.broker_b.subscriptions
        figures = await fault(n, redis_service.kill, redis_service.start, 5.0, bound=2.0)
        assert n.broker_b.subscriptions > before  # the loss was noticed and the node resubscribed
        assert n.broker_a.dropped > 0  # A's publishes failed meanwhile, and nothing was lost
        print(f"\nRedis killed for 5 s: {figures}")


async def test_pubsub_connections_killed_under_publishing(
    redis_service: RedisServer, schema: Callable[[], Store]
) -> None:
    async with nodes(redis_service, schema) as n:
        before = n.broker_b.subscriptions

        def cut() -> None:
            assert redis_service.command("CLIENT", "KILL", "TYPE", "pubsub") == b":2"

        figures = await fault(n, cut, lambda: None, 0.5, bound=2.0)
        assert n.broker_b.subscriptions > before
        print(f"\nCLIENT KILL TYPE pubsub: {figures}")


async def test_a_frozen_redis_is_noticed_by_its_silence(
    redis_service: RedisServer, schema: Callable[[], Store]
) -> None:
    """SIGSTOP: every connection stays open and nothing comes back. The heartbeat notices;
    meanwhile the node reads the log; after SIGCONT it subscribes again."""
    async with nodes(redis_service, schema) as n:
        before = n.broker_b.subscriptions
        figures = await fault(n, redis_service.freeze, redis_service.thaw, 4.0, bound=3.5)
        assert n.broker_b.silences >= 1
        assert n.broker_b.subscriptions > before
        print(f"\nRedis SIGSTOP for 4 s: {figures}")


async def test_a_node_started_while_redis_is_down_serves_from_the_log_then_goes_live(
    redis_service: RedisServer, schema: Callable[[], Store]
) -> None:
    """Redis is down when the nodes start: they start anyway (after `2 * timeout`), devices get
    changes from the log meanwhile, and once Redis is up the nodes subscribe and go live."""
    redis_service.kill()
    async with nodes(redis_service, schema, timeout=0.5) as n:
        assert n.broker_b.subscriptions == 0
        devices = listen(n)
        for i in range(10):
            await n.post(USERS[i % len(USERS)])
        polled = await complete(n, devices, limit=5.0)
        redis_service.start()
        await until(lambda: n.broker_a.subscriptions and n.broker_b.subscriptions, "subscribed")
        begun = time.monotonic()
        await n.post(USERS[0])
        live = await complete(n, devices, limit=5.0)
        await equal_to_delta(n, devices)
        print(
            f"\nstarted without Redis: from the log within {polled * 1000:.0f} ms;"
            f" once subscribed, live in {live * 1000:.0f} ms ({time.monotonic() - begun:.3f} s)"
        )
