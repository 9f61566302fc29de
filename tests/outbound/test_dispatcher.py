"""The dispatcher over a real store: every committed change is published once, in per-user
order, and stays in the outbox (to be published again) until its removal has committed."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime, timedelta

import pytest

from herald.errors import Unavailable
from herald.metrics import Metrics
from herald.model import (
    ApnsChannel,
    Change,
    DevicePlatform,
    NewDelivery,
    Priority,
    Provider,
    PushKind,
    ReadState,
    StatePatch,
    Subscription,
)
from herald.outbound.dispatcher import Dispatcher
from herald.preferences import HeldPush, NotificationPreferences
from herald.store import Store
from tests.pg import StatementCounter
from tests.store.conftest import Backend
from tests.store.support import APP, content, new_id

WAIT = 10.0


class Recorder:
    """A broker that records what it is asked to publish."""

    def __init__(self) -> None:
        self.published: list[Change] = []
        self.arrived = asyncio.Event()

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def listen(self, user_id: str, app: str, listener: object) -> None: ...

    def unlisten(self, user_id: str, app: str, listener: object) -> None: ...

    async def publish(self, change: Change) -> None:
        self.published.append(change)
        self.arrived.set()

    async def revoke(self, user_id: str, app: str, subscription_id: str) -> None: ...


async def until(condition: Callable[[], bool], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + WAIT
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def test_every_change_is_published_once_in_per_user_order(store: Store) -> None:
    broker = Recorder()
    dispatcher = Dispatcher(store, broker, Metrics(), poll=0.05)  # type: ignore[arg-type]
    await dispatcher.start()
    try:
        now = datetime.now().astimezone()
        users = [f"u{i}" for i in range(7)]
        await asyncio.gather(
            *(store.put(users[i % 7], APP, content(), new_id(), now) for i in range(300))
        )
        await until(lambda: len(broker.published) >= 300 and not dispatcher.removing, "all")
        assert await store.pending(10) == []
    finally:
        await dispatcher.close()
    keys = [(c.user_id, c.position) for c in broker.published]
    assert len(keys) == len(set(keys)) == 300
    for user in users:
        positions = [c.position for c in broker.published if c.user_id == user]
        assert positions == sorted(positions) and len(positions) in (42, 43)


class FailingRemovals:
    """The store, except that removing dispatched entries fails while `failing` is set."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.failing = True

    def __getattr__(self, name: str) -> object:
        return getattr(self.store, name)

    async def dispatched(
        self,
        seqs: Sequence[int],
        deliveries: Sequence[NewDelivery] = (),
        held: Sequence[HeldPush] = (),
    ) -> None:
        if self.failing:
            raise Unavailable("the database went away")
        await self.store.dispatched(seqs, deliveries, held)


async def test_a_change_whose_removal_failed_is_published_again(store: Store) -> None:
    flaky = FailingRemovals(store)
    broker = Recorder()
    dispatcher = Dispatcher(flaky, broker, Metrics(), poll=0.05)  # type: ignore[arg-type]
    await dispatcher.start()
    try:
        n, _ = await store.put("u", APP, content(), new_id(), datetime.now().astimezone())
        await until(lambda: len(broker.published) >= 2, "published again")  # removal failed
        assert {(c.position, c.notification_id) for c in broker.published} == {(1, n.id)}
        flaky.failing = False
        await until(lambda: not dispatcher.removing and dispatcher.dispatched == 1, "removed")
        assert await store.pending(10) == []
        count = len(broker.published)
        await asyncio.sleep(0.2)  # several polls: nothing more once it is gone
        assert len(broker.published) == count
    finally:
        await dispatcher.close()


class SlowTargets:
    """The store, except that looking up push targets (with their users' preferences) waits
    until `answer` is set."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.answer = asyncio.Event()
        self.asked = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.store, name)

    async def push_audience(
        self, pairs: Sequence[tuple[str, str]], now: datetime
    ) -> tuple[list[Subscription], dict[tuple[str, str], NotificationPreferences]]:
        self.asked += 1
        await self.answer.wait()
        return await self.store.push_audience(pairs, now)


async def test_live_delivery_does_not_wait_for_the_push_target_lookup(store: Store) -> None:
    """A batch's push targets are looked up after it is published, and the next batch is
    published while that lookup is still waiting; the pushes are queued all the same."""
    now = datetime.now().astimezone()
    await add_phone(store, "u1", "ab" * 32, now)
    slow = SlowTargets(store)
    broker = Recorder()
    dispatcher = Dispatcher(
        slow,  # type: ignore[arg-type]
        broker,  # type: ignore[arg-type]
        Metrics(),
        poll=0.05,
        pushed=lambda providers: None,
    )
    await dispatcher.start()
    try:
        await store.put("u1", APP, content(), new_id(), now)
        await until(lambda: len(broker.published) == 1 and slow.asked == 1, "the first lookup")
        await store.put("u1", APP, content(), new_id(), now)
        await until(lambda: len(broker.published) == 2, "the second batch published")
        assert await store.count_deliveries() == 0  # nothing queued while the lookup waits
        slow.answer.set()
        await until(lambda: dispatcher.dispatched == 2 and not dispatcher.removing, "removed")
        assert await store.pending(10) == []
        assert await store.count_deliveries(Provider.APNS) == 2
    finally:
        await dispatcher.close()


async def add_phone(store: Store, user: str, token: str, now: datetime) -> None:
    """An iOS subscription of `user` with an APNs channel."""
    sub = Subscription(
        id=f"sub-{user}",
        user_id=user,
        app=APP,
        platform=DevicePlatform.IOS,
        display_name=None,
        push_channel=ApnsChannel(token),
        expiration_date_time=now + timedelta(days=1),
        created_date_time=now,
        last_modified_date_time=now,
    )
    await store.add_subscription(sub, 10, now)


async def test_pushes_are_queued_once_however_often_a_change_is_published(store: Store) -> None:
    """The pushes of a change are queued with its outbox removal: a failed removal (the change
    is published again) queues nothing, and 300 changes queue exactly 300 pushes."""
    now = datetime.now().astimezone()
    for user in ("u0", "u1", "u2"):
        await add_phone(store, user, user.encode().hex() * 20, now)
    flaky = FailingRemovals(store)
    woken: list[Provider] = []
    dispatcher = Dispatcher(
        flaky,  # type: ignore[arg-type]
        Recorder(),  # type: ignore[arg-type]
        Metrics(),
        poll=0.01,
        pushed=woken.extend,
    )
    await dispatcher.start()
    try:
        await store.put("u0", APP, content(), new_id(), now)
        await asyncio.sleep(0.2)  # removals keep failing: published again and again
        assert await store.count_deliveries() == 0
        flaky.failing = False
        await asyncio.gather(
            *(store.put(f"u{i % 3}", APP, content(), new_id(), now) for i in range(299))
        )
        await until(lambda: dispatcher.dispatched == 300 and not dispatcher.removing, "all")
        assert await store.pending(10) == []
        assert await store.count_deliveries(Provider.APNS) == 300
        assert set(woken) == {Provider.APNS}
    finally:
        await dispatcher.close()


async def dispatch(store: Store, changes: int) -> None:
    """Run a dispatcher (with push on) until it has dispatched `changes` changes, in one batch
    when they were all committed before it started."""
    dispatcher = Dispatcher(
        store,
        Recorder(),  # type: ignore[arg-type]
        Metrics(),
        poll=0.01,
        pushed=lambda providers: None,
    )
    await dispatcher.start()
    try:
        await until(
            lambda: dispatcher.dispatched == changes and not dispatcher.removing, "dispatched"
        )
    finally:
        await dispatcher.close()


async def test_a_later_change_in_the_same_batch_supersedes_earlier_pushes(store: Store) -> None:
    """Created and then read before the dispatcher ran: the device gets one push, for the later
    change (an earlier one retried later must never arrive after it)."""
    now = datetime.now().astimezone()
    await add_phone(store, "u9", "ab" * 32, now)
    n, _ = await store.put("u9", APP, content(), new_id(), now)
    await store.update("u9", APP, n.id, StatePatch(read_state=ReadState.READ), None, now)
    await dispatch(store, 2)
    [claimed] = await store.claim(Provider.APNS, datetime.now().astimezone(), 60.0, 10)
    assert claimed.message.kind is PushKind.SYNC and claimed.message.notification_id == n.id
    assert claimed.message.position == 2 and claimed.message.read_state is ReadState.READ


async def test_a_new_notification_patched_in_the_same_batch_still_alerts(store: Store) -> None:
    """Created and then re-prioritised (still unread) before the dispatcher ran: one push, the
    later state, and still an alert (the device has never been told of it)."""
    now = datetime.now().astimezone()
    await add_phone(store, "u8", "cd" * 32, now)
    n, _ = await store.put("u8", APP, content(), new_id(), now)
    await store.update("u8", APP, n.id, StatePatch(priority=Priority.LOW), None, now)
    await dispatch(store, 2)
    [claimed] = await store.claim(Provider.APNS, datetime.now().astimezone(), 60.0, 10)
    assert claimed.message.kind is PushKind.ALERT and claimed.message.position == 2
    assert claimed.message.priority is Priority.LOW


@contextlib.asynccontextmanager
async def counted(
    postgres: Backend,
) -> AsyncIterator[tuple[StatementCounter, Store, Recorder, Dispatcher]]:
    """A PostgreSQL store behind a statement counter (`tests/pg.py`), and a started dispatcher
    that never polls, publishing to a `Recorder`."""
    from herald.store.postgres import PostgresStore

    assert postgres.dsn is not None
    counter, url = await StatementCounter.in_front_of(postgres.dsn)
    store = PostgresStore(url, min_size=1)
    await store.open()
    broker = Recorder()
    dispatcher = Dispatcher(store, broker, Metrics(), poll=60)  # type: ignore[arg-type]
    await dispatcher.start()
    try:
        yield counter, store, broker, dispatcher
    finally:
        await dispatcher.close()
        await store.close()
        await counter.close()


@pytest.mark.postgres
async def test_a_live_delivery_costs_postgres_few_statements(postgres: Backend) -> None:
    """What a change costs PostgreSQL from commit to removal, with no pushes to queue: the put
    (one statement, which also answers the change's outbox entry: the dispatcher publishes it
    without reading it back) and the removal (one statement, `herald_dispatched`: it was BEGIN,
    DELETE, COMMIT). Before the hand-over there was a third, the dispatcher's outbox read, on
    the path of every live delivery. Counted by a proxy on the wire."""
    async with counted(postgres) as (counter, store, broker, dispatcher):
        now = datetime.now().astimezone()
        for n in range(1, 4):  # the first rounds prepare the statements on each connection
            before = counter.statements
            await store.put("u1", APP, content(), new_id(), now)
            await until(
                lambda n=n: len(broker.published) == n and not dispatcher.removals, "removal"
            )
            await asyncio.sleep(0.1)  # anything else that would follow
            statements = counter.statements - before
        assert await store.pending(10) == []
    assert statements <= 2, f"{statements} statements for one live delivery"


@pytest.mark.postgres
async def test_posts_published_at_commit_are_removed_together(
    postgres: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Posts in quick succession, each published as it commits: their removals wait a moment
    (`GATHER_SECONDS`, made long enough here for a slow machine's ten posts) to go as one
    statement, and no outbox read follows them (they were one read and one removal per post)."""
    from herald.outbound import dispatcher as module

    monkeypatch.setattr(module, "GATHER_SECONDS", 1.0)

    posts = 10
    async with counted(postgres) as (counter, store, broker, dispatcher):
        now = datetime.now().astimezone()
        # First uses prepare the statements (and their types) on each writer's connection.
        for i in range(4):
            await store.put(f"w{i}", APP, content(), new_id(), now)
        await asyncio.gather(*(store.put(f"w{i}", APP, content(), new_id(), now) for i in range(4)))
        await until(lambda: len(broker.published) == 8 and not dispatcher.removals, "warm")
        before = counter.statements
        for i in range(posts):
            await store.put(f"u{i}", APP, content(), new_id(), now)
        await until(lambda: len(broker.published) == 8 + posts and not dispatcher.removals, "all")
        statements = counter.statements - before
        assert await store.pending(10) == []
    assert statements <= posts + 2, f"{statements} statements for {posts} posts"


@pytest.mark.postgres
async def test_a_post_behind_an_undispatched_change_is_published_after_it(
    postgres: Backend,
) -> None:
    """A post is published as it commits only if every earlier change of its user has been
    removed from the outbox: one whose user's previous change is still there (its removal
    failed, or had not committed) comes from the outbox read, after that change."""
    store = postgres.make()
    await store.open()
    flaky = FailingRemovals(store)
    broker = Recorder()
    dispatcher = Dispatcher(flaky, broker, Metrics(), poll=0.05)  # type: ignore[arg-type]
    await dispatcher.start()
    try:
        now = datetime.now().astimezone()
        await store.put("u", APP, content(), new_id(), now)
        await until(lambda: len(broker.published) >= 1, "the first post")
        await store.put("u", APP, content(), new_id(), now)
        await until(lambda: any(c.position == 2 for c in broker.published), "the second post")
        flaky.failing = False
        await until(lambda: not dispatcher.removing and dispatcher.dispatched == 2, "removed")
        assert await store.pending(10) == []
    finally:
        await dispatcher.close()
        await store.close()
    positions = [c.position for c in broker.published]
    assert positions.index(1) < positions.index(2), positions


async def test_at_a_trickle_a_removal_shares_the_next_posts_sqlite_commit(
    sqlite_file: Backend,
) -> None:
    """Posts one at a time, each published a moment before the next arrives: the removal of each
    (which nobody waits on) is committed with the next post instead of in a commit of its own,
    so the WAL takes one commit per post, not two (herald_sqlite_commits_total)."""
    from prometheus_client import CollectorRegistry

    from herald.store.sqlite import SqliteStore

    store = sqlite_file.make()
    assert isinstance(store, SqliteStore)
    registry = CollectorRegistry()
    for collector in store.metrics.collectors():
        registry.register(collector)
    await store.open()
    broker = Recorder()
    dispatcher = Dispatcher(store, broker, Metrics(), poll=60)  # type: ignore[arg-type]
    await dispatcher.start()
    posts = 20
    try:
        now = datetime.now().astimezone()
        before = registry.get_sample_value("herald_sqlite_commits_total") or 0.0
        for _ in range(posts):
            broker.arrived.clear()
            await store.put("u1", APP, content(), new_id(), now)
            await asyncio.wait_for(broker.arrived.wait(), WAIT)
            await asyncio.sleep(0.0005)  # the next post comes a moment after
        await until(lambda: not dispatcher.removing, "the last removal")
        commits = (registry.get_sample_value("herald_sqlite_commits_total") or 0.0) - before
        writes = registry.get_sample_value("herald_sqlite_writes_total")
        assert await store.pending(10) == []
    finally:
        await dispatcher.close()
        await store.close()
    # One commit per post (and one for the last removal); some slack for a slow machine, where
    # a moment may outlast the wait. A commit of its own for each removal makes it 2 * posts.
    assert commits <= 1.5 * posts, f"{commits:.0f} commits for {posts} posts and their removals"
    assert writes is not None and writes >= 2 * posts


@pytest.mark.postgres
async def test_a_small_pool_keeps_a_connection_for_other_reads(postgres: Backend) -> None:
    """The dispatcher keeps connections for its reads only when the pool has room for them
    besides the writers' and at least one for every other read: with 3 connections in all (two
    writers), a read through the pool still gets one while the dispatcher works."""
    from herald.store.postgres import PostgresStore

    assert postgres.dsn is not None
    store = PostgresStore(postgres.dsn, min_size=1, max_size=3)
    await store.open()
    broker = Recorder()
    dispatcher = Dispatcher(store, broker, Metrics(), poll=0.05)  # type: ignore[arg-type]
    await dispatcher.start()
    try:
        now = datetime.now().astimezone()
        await store.put("u1", APP, content(), new_id(), now)
        await until(lambda: len(broker.published) == 1 and not dispatcher.removals, "dispatch")
        async with asyncio.timeout(WAIT):
            assert await store.get_subscription("none", now) is None
    finally:
        await dispatcher.close()
        await store.close()


@pytest.mark.postgres
async def test_an_op_waiting_on_a_row_lock_holds_up_no_live_delivery(postgres: Backend) -> None:
    """A node frozen mid-transaction keeps its row locks until PostgreSQL ends its session, and
    this node's ops that need those rows wait as long. The dispatcher's removals must not wait
    with them: they did (an op each, behind the waiting one), and once `MAX_REMOVALS` of them
    were in flight the dispatcher published nothing more, for any user."""
    import asyncpg

    assert postgres.dsn is not None
    store = postgres.make()
    await store.open()
    broker = Recorder()
    dispatcher = Dispatcher(store, broker, Metrics(), poll=0.05)  # type: ignore[arg-type]
    await dispatcher.start()
    frozen = await asyncpg.connect(postgres.dsn)
    tx = frozen.transaction()
    await tx.start()
    held: asyncio.Task[object] | None = None
    try:
        now = datetime.now().astimezone()
        n1, _ = await store.put("u1", APP, content(), new_id(), now)
        await until(lambda: len(broker.published) == 1 and not dispatcher.removals, "dispatch")
        # As a node stopped inside a transaction that changed u1's feed.
        await frozen.execute("SELECT 1 FROM feed_heads WHERE user_id = 'u1' FOR UPDATE")
        held = asyncio.create_task(store.delete("u1", APP, n1.id, None, now))
        await asyncio.sleep(0.3)  # the ops transaction now waits on the lock
        for i in range(2, 12):  # a batch each: more removals than MAX_REMOVALS
            await store.put(f"u{i}", APP, content(), new_id(), now)
            await until(lambda i=i: len(broker.published) == i, f"live delivery of post {i}")
        await until(lambda: not dispatcher.removals, "the removals")
        assert await store.waiting(100) == 0
        assert not held.done()
    finally:
        await tx.rollback()
        await frozen.close()
        if held is not None:
            async with asyncio.timeout(WAIT):
                await held
        await dispatcher.close()
        await store.close()


@pytest.mark.postgres
async def test_removals_through_the_pool_keep_their_order(postgres: Backend) -> None:
    """With a pool too small to keep a connection for removals, they go through the pool, and
    must still run one at a time in the order they come (a later change's pushes supersede an
    earlier one's): a removal waiting on a row lock holds up the next."""
    import asyncpg

    from herald.store.postgres import PostgresStore

    assert postgres.dsn is not None
    # 6: two writers and room for other calls, but not for the four kept connections.
    store = PostgresStore(postgres.dsn, min_size=1, max_size=6)
    await store.open()
    blocker = await asyncpg.connect(postgres.dsn)
    tx = blocker.transaction()
    await tx.start()
    try:
        now = datetime.now().astimezone()
        for user in ("u1", "u2"):
            await store.put(user, APP, content(), new_id(), now)
        first, second = await store.pending(10)
        await blocker.execute("SELECT FROM outbox WHERE seq = $1 FOR UPDATE", first.seq)
        earlier = asyncio.create_task(store.dispatched([first.seq]))
        await asyncio.sleep(0.3)  # it waits on the row lock
        later = asyncio.create_task(store.dispatched([second.seq]))
        await asyncio.sleep(0.5)
        assert not later.done(), "a removal overtook the one before it"
    finally:
        await tx.rollback()
        await blocker.close()
    async with asyncio.timeout(WAIT):
        await asyncio.gather(earlier, later)
    assert await store.pending(10) == []
    await store.close()
