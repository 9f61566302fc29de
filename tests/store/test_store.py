"""What holds for a whole store on every backend: durability across a reopen, group commit (one
failing call fails alone), two stores on one database, and the SQLite URL's options."""

from __future__ import annotations

import asyncio
import pathlib

import pytest

from herald.errors import Conflict, HeraldError, PreconditionFailed, Unavailable
from herald.model import App, StatePatch
from herald.query import Query
from herald.store import Store
from herald.store.sqlite import SqliteStore

from .conftest import Backend
from .support import APP, T0, content, new_id, put, two_nodes


async def test_reopen_keeps_data(durable_backend: Backend) -> None:
    backend = durable_backend
    first = backend.make()
    await first.open()
    nid, _ = await put(first, "a")
    await first.close()
    await first.close()  # idempotent
    second = backend.make()
    await second.open()
    try:
        await second.ping()
        n = await second.get("u1", APP, nid, T0)
        assert n is not None and n.app_notification_id == "a"
        assert await second.horizon("u1") == (0, 1)
    finally:
        await second.close()


async def test_two_stores_on_one_database(durable_backend: Backend) -> None:
    """Two Herald processes (or a server and the CLI) writing the same feed stay gap-free."""
    backend = durable_backend
    async with two_nodes(backend) as (a, b):
        await asyncio.gather(
            *(s.put("u1", APP, content(f"k{i}"), new_id(), T0) for i in range(100) for s in (a, b))
        )
        assert [c.position for c in await a.changes("u1", APP, 0, 500)] == list(range(1, 201))


async def test_one_failing_call_does_not_fail_its_batch(store: Store) -> None:
    nid, _ = await put(store, "a")
    dup = App(
        client_id="c1", host_name=APP, display_name="A", secret_hash="h", created_date_time=T0
    )
    await store.add_app(dup)
    outcomes = await asyncio.gather(
        *(store.put("u1", APP, content(f"b{i}"), new_id(), T0) for i in range(10)),
        store.update("u1", APP, nid, StatePatch(), 99, T0),  # precondition fails
        store.add_app(dup),  # conflict
        store.put("u1", APP, content("dup-id"), nid, T0),  # new id collides with an existing id
        *(store.put("u1", APP, content(f"c{i}"), new_id(), T0) for i in range(10)),
        return_exceptions=True,
    )
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    assert isinstance(outcomes[10], PreconditionFailed)
    assert isinstance(outcomes[11], Conflict)
    assert isinstance(outcomes[12], HeraldError)
    assert len(errors) == 3
    assert await store.count("u1", APP, None, T0) == 21
    positions = [c.position for c in await store.changes("u1", APP, 0, 100)]
    assert positions == list(range(1, 22))


async def test_concurrent_mixed_writes_and_reads(store: Store) -> None:
    nid, _ = await put(store, "a")
    calls = []
    for i in range(100):
        calls.append(store.put("u1", APP, content(f"m{i}"), new_id(), T0))
        calls.append(store.update("u1", APP, nid, StatePatch(), None, T0))
        calls.append(store.changes("u1", APP, 0, 1000))
    await asyncio.gather(*calls)
    assert [c.position for c in await store.changes("u1", APP, 0, 1000)] == list(range(1, 202))
    n = await store.get("u1", APP, nid, T0)
    assert n is not None and n.version == 101


async def test_sqlite_url_options(tmp_path: pathlib.Path) -> None:

    store = SqliteStore(f"sqlite:///{tmp_path}/a.db?synchronous=full")
    await store.open()
    try:
        await store.ping()
    finally:
        await store.close()
    with pytest.raises(ValueError, match="unknown SQLite URL option"):
        SqliteStore(f"sqlite:///{tmp_path}/a.db?sync=full")
    with pytest.raises(ValueError, match="normal or full"):
        SqliteStore(f"sqlite:///{tmp_path}/a.db?synchronous=off")


async def test_a_closed_store_answers_unavailable(backend: Backend) -> None:
    """Every call on a store that is not open is answered `Unavailable`, reads and writes alike
    (only `herald.errors` escape)."""
    store = backend.make()
    await store.open()
    await store.close()
    calls = [
        store.ping(),
        store.put("u1", APP, content("a"), new_id(), T0),
        store.get("u1", APP, "x", T0),
        store.list("u1", APP, Query(), T0),
        store.changes("u1", None, 0, 10),
        store.pending(10),
        store.get_app("c1"),
        store.recall("s", "k", T0),
    ]
    for call in calls:
        with pytest.raises(Unavailable):
            await call
