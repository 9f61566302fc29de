"""The `Idempotency` contract on every backend, and `Notifications.put_once`, which writes its
records: a key is recorded once, with its notification or not at all."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from herald.errors import HeraldError
from herald.model import Notification
from herald.store import Remembered, Store

from .conftest import Backend
from .support import APP, T0, content, new_id, notifications, once, remembered, two_nodes


async def test_idempotency_recall_and_expiry(store: Store) -> None:
    assert await store.recall("app1", "key", T0) is None
    exp = T0 + timedelta(hours=1)
    await remembered(store, "app1", "key", "fp1", 201, b'{"id":"x"}', "/loc/x", exp)
    second = once("key", "fp2", scope="app1")  # finds the record: the first one is kept
    kept = await store.put_once("u1", APP, content(), new_id(), T0, second)
    got = await store.recall("app1", "key", T0)
    assert got is not None and got == kept
    assert (got.fingerprint, got.status, got.body, got.location) == (
        "fp1",
        201,
        b'{"id":"x"}',
        "/loc/x",
    )
    assert await store.recall("app2", "key", T0) is None
    assert await store.recall("app1", "key", exp) is None


async def test_put_once_records_the_answer_with_the_put(store: Store) -> None:
    nid = new_id()
    first = await store.put_once("u1", APP, content(), nid, T0, once())
    assert (first.status, first.location, first.fingerprint) == (201, nid, "fp")
    assert first.body == f"{nid} v1 {nid}".encode()
    assert await store.recall("app1:u1", "k", T0) == first
    # Replacing by appNotificationId: 200, and the answer shows the stored version.
    await store.put("u1", APP, content("a"), new_id(), T0)
    replaced = await store.put_once("u1", APP, content("a"), new_id(), T0, once("k2"))
    assert replaced.status == 200 and replaced.location is None
    assert replaced.body.endswith(b" v2 a")
    assert len(await notifications(store)) == 2


async def test_put_once_with_a_recorded_key_writes_nothing(store: Store) -> None:
    """Whoever recorded the key first (another request, process or node) wins: a later put with
    it writes nothing and gets the recorded answer, whatever its own fingerprint."""
    first = await store.put_once("u1", APP, content(), new_id(), T0, once())
    again = await store.put_once("u1", APP, content(), new_id(), T0, once())
    other = await store.put_once("u1", APP, content(), new_id(), T0, once(fingerprint="fp2"))
    assert again == other == first
    await remembered(store, "app1:u1", "r", "fp", 201, b"kept", None, T0 + timedelta(hours=1))
    assert (await store.put_once("u1", APP, content(), new_id(), T0, once("r"))).body == b"kept"
    assert len(await notifications(store)) == 1
    assert await store.horizon("u1") == (0, 1)


async def test_put_once_replaces_an_expired_record(store: Store) -> None:
    await store.put_once("u1", APP, content(), new_id(), T0, once(expires=T0))
    later = T0 + timedelta(seconds=1)
    nid = new_id()
    second = await store.put_once(
        "u1", APP, content(), nid, later, once(expires=T0 + timedelta(days=1))
    )
    assert second.location == nid
    assert await store.recall("app1:u1", "k", later) == second
    assert len(await notifications(store)) == 2


async def test_put_once_is_one_transaction(store: Store) -> None:
    """The answer is rendered inside the put's transaction: if it cannot be made (nor so the
    record stored), the notification is not stored either, and other calls are unharmed."""

    def broken(n: Notification, created: bool) -> Remembered:
        raise RuntimeError("no answer")

    results = await asyncio.gather(
        store.put_once("u1", APP, content("x"), new_id(), T0, once("bad", render=broken)),
        store.put_once("u1", APP, content("y"), new_id(), T0, once("good")),
        store.put("u1", APP, content("z"), new_id(), T0),
        return_exceptions=True,
    )
    assert isinstance(results[0], HeraldError | RuntimeError)
    assert sorted(n.app_notification_id or "" for n in await notifications(store)) == ["y", "z"]
    assert await store.recall("app1:u1", "bad", T0) is None
    assert await store.recall("app1:u1", "good", T0) == results[1]
    assert [c.position for c in await store.changes("u1", APP, 0, 10)] == [1, 2]


async def test_put_once_calls_with_one_key_at_once_post_once(store: Store) -> None:
    """Calls with the same key that reach the store together (the API serialises them per
    process; two nodes cannot): one is written, every one gets its answer."""
    ids = [new_id() for _ in range(5)]
    keyed, _ = await asyncio.gather(
        asyncio.gather(*(store.put_once("u1", APP, content(), i, T0, once()) for i in ids)),
        asyncio.gather(*(store.put("u1", APP, content(), new_id(), T0) for _ in range(3))),
    )
    assert all(a == keyed[0] for a in keyed) and keyed[0].status == 201
    assert len(await notifications(store)) == 4


async def test_put_once_across_two_stores(durable_backend: Backend) -> None:
    """Two nodes on one database: the key is recorded once, whichever node commits first."""
    async with two_nodes(durable_backend) as (a, b):
        first = await a.put_once("u1", APP, content(), new_id(), T0, once())
        second = await b.put_once("u1", APP, content(), new_id(), T0, once(fingerprint="fp2"))
        assert second == first
        assert len(await notifications(b)) == 1


@pytest.mark.postgres
async def test_put_once_waits_for_a_concurrent_record_and_replays_it(postgres: Backend) -> None:
    """Another node's transaction has recorded the key but not committed: the put waits for it,
    then rolls back everything it wrote and answers with that record."""
    import asyncpg

    assert postgres.dsn is not None
    store = postgres.make()
    await store.open()
    other = await asyncpg.connect(postgres.dsn)
    try:
        await store.put("u1", APP, content("warm"), new_id(), T0)  # the tables exist
        tx = other.transaction()
        await tx.start()
        await other.execute(
            "INSERT INTO idempotency VALUES ('app1:u1', 'k', 'fp2', 201, 'theirs', NULL, $1)",
            T0 + timedelta(hours=1),
        )
        mine = asyncio.create_task(store.put_once("u1", APP, content(), new_id(), T0, once()))
        plain = asyncio.create_task(store.put("u1", APP, content("plain"), new_id(), T0))
        await asyncio.sleep(0.5)
        assert not mine.done()
        await tx.commit()
        answer = await mine
        assert (answer.fingerprint, answer.body) == ("fp2", b"theirs")
        await plain  # in the same batch, written in the second round
        assert sorted(n.app_notification_id or "" for n in await notifications(store)) == [
            "plain",
            "warm",
        ]
        assert [c.position for c in await store.changes("u1", APP, 0, 10)] == [1, 2]
    finally:
        await other.close()
        await store.close()
