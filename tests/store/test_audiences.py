"""The `Audiences` contract on every backend: audiences and their members, and sends stored
whole (content and recipients) with their progress."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from herald.errors import Conflict, NotFound, QuotaExceeded
from herald.model import App
from herald.store import Send, Store
from herald.store.contract import Failure

from .conftest import Backend
from .support import APP, T0, content, new_id, once, two_nodes

OTHER = "other.example.com"


def send(id: str, key: str | None = None, audience: str | None = None, app: str = APP) -> Send:
    return Send(
        id=id,
        app=app,
        idempotency_key=key,
        fingerprint=f"fp-{id}",
        audience=audience,
        content=b"\x81\xa1a\x01",
        total=0,
        done=0,
        failed=0,
        status="notStarted",
        created=T0,
        last_action=T0,
    )


async def test_audiences_are_per_app_and_unique(store: Store) -> None:
    a = await store.put_audience(APP, "beta", "Beta testers", 3, T0)
    assert (a.app, a.id, a.display_name, a.created, a.members) == (
        APP,
        "beta",
        "Beta testers",
        T0,
        0,
    )
    with pytest.raises(Conflict):
        await store.put_audience(APP, "beta", None, 3, T0)
    await store.put_audience(OTHER, "beta", None, 3, T0)  # another app's namespace
    await store.put_audience(APP, "alpha", None, 3, T0)
    await store.put_audience(APP, "gamma", None, 3, T0)
    with pytest.raises(QuotaExceeded):
        await store.put_audience(APP, "delta", None, 3, T0)
    assert [x.id for x in await store.list_audiences(APP)] == ["alpha", "beta", "gamma"]
    assert await store.get_audience(APP, "delta") is None
    assert await store.delete_audience(APP, "beta")
    assert not await store.delete_audience(APP, "beta")
    assert await store.get_audience(APP, "beta") is None
    other = await store.get_audience(OTHER, "beta")
    assert other is not None and other.app == OTHER


async def test_members_are_added_removed_and_paged(store: Store) -> None:
    await store.put_audience(APP, "a", None, 10, T0)
    assert await store.add_members(APP, "a", ["u3", "u1", "u2"], 4) == 3
    assert await store.add_members(APP, "a", ["u1", "u4"], 4) == 1  # u1 is already in
    with pytest.raises(QuotaExceeded):
        await store.add_members(APP, "a", ["u5", "u6"], 4)
    assert await store.members(APP, "a", None, 10) == ["u1", "u2", "u3", "u4"]  # none added
    assert await store.members(APP, "a", None, 2) == ["u1", "u2"]
    assert await store.members(APP, "a", "u2", 2) == ["u3", "u4"]
    assert await store.remove_members(APP, "a", ["u2", "nobody"]) == 1
    audience = await store.get_audience(APP, "a")
    assert audience is not None and audience.members == 3
    for call in (
        store.add_members(APP, "none", ["u1"], 4),
        store.remove_members(APP, "none", ["u1"]),
        store.members(APP, "none", None, 10),
        store.add_members(OTHER, "a", ["u1"], 4),  # another app's audience is absent
    ):
        with pytest.raises(NotFound):
            await call
    assert await store.delete_audience(APP, "a")
    await store.put_audience(APP, "a", None, 10, T0)
    assert await store.members(APP, "a", None, 10) == []  # the members went with it


async def test_a_send_is_stored_whole_and_its_key_answers_once(store: Store) -> None:
    stored, created = await store.start_send(send("s1", "k"), ["u2", "u1", "u3"], 100)
    assert created and stored.total == 3 and stored.status == "notStarted"
    assert await store.get_send(APP, "s1") == stored
    assert await store.get_send(OTHER, "s1") is None
    assert await store.send_recipients("s1", 0, 10) == ["u2", "u1", "u3"]
    assert await store.send_recipients("s1", 1, 1) == ["u1"]
    again, created = await store.start_send(send("s2", "k"), ["u9"], 100)
    assert not created and again == stored  # the first send, and nothing written
    assert await store.get_send(APP, "s2") is None
    assert await store.send_recipients("s2", 0, 10) == []
    _, created = await store.start_send(send("s3", "k", app=OTHER), ["u1"], 100)
    assert created  # keys are per app
    _, created = await store.start_send(send("s4"), ["u1"], 100)
    _, created_too = await store.start_send(send("s5"), ["u1"], 100)
    assert created and created_too  # without a key every send is new


async def test_a_send_to_an_audience_snapshots_its_members(store: Store) -> None:
    await store.put_audience(APP, "a", None, 10, T0)
    await store.add_members(APP, "a", ["u2", "u1"], 10)
    stored, _ = await store.start_send(send("s1", audience="a"), None, 2)
    assert stored.total == 2 and stored.audience == "a"
    await store.add_members(APP, "a", ["u3"], 10)
    assert await store.send_recipients("s1", 0, 10) == ["u1", "u2"]
    with pytest.raises(QuotaExceeded):
        await store.start_send(send("s2", audience="a"), None, 2)
    with pytest.raises(NotFound):
        await store.start_send(send("s3", audience="none"), None, 2)
    assert await store.get_send(APP, "s2") is None and await store.get_send(APP, "s3") is None


async def test_progress_moves_forward_and_counts_each_failure_once(store: Store) -> None:
    await store.start_send(send("s1"), ["u1", "u2", "u3", "u4"], 100)
    await store.start_send(send("s2"), ["u1"], 100)
    assert [s.id for s in await store.unfinished_sends(10)] == ["s1", "s2"]
    later = T0 + timedelta(seconds=5)
    gone = Failure("u2", "userNotFound", "no such user")
    await store.send_progress("s1", 2, [gone], "running", later)
    await store.send_progress("s1", 2, [gone], "running", later)  # a batch redone: counted once
    await store.send_progress("s1", 1, [], "running", later)  # never goes back
    s = await store.get_send(APP, "s1")
    assert s is not None
    assert (s.done, s.failed, s.status, s.last_action, s.finished) == (2, 1, "running", later, None)
    await store.send_progress("s1", 4, [], "succeeded", later)
    s = await store.get_send(APP, "s1")
    assert s is not None and (s.done, s.status, s.finished) == (4, "succeeded", later)
    assert await store.send_failures(APP, "s1", 10) == [gone]
    assert await store.send_failures(OTHER, "s1", 10) == []
    assert [s.id for s in await store.unfinished_sends(10)] == ["s2"]


async def test_the_first_of_two_nodes_stores_a_key(durable_backend: Backend) -> None:
    async with two_nodes(durable_backend) as (a, b):
        results = await asyncio.gather(
            a.start_send(send("s1", "k"), ["u1"], 100),
            b.start_send(send("s2", "k"), ["u2"], 100),
        )
        assert sorted(created for _, created in results) == [False, True]
        first = results[0][0] if results[0][1] else results[1][0]
        assert [r[0] for r in results] == [first, first]
        assert len(await a.unfinished_sends(10)) == 1


async def test_deleting_the_app_removes_its_audiences_and_sends(store: Store) -> None:
    await store.add_app(
        App(client_id="a1", host_name=APP, display_name="A", secret_hash="h", created_date_time=T0)
    )
    await store.add_app(
        App(
            client_id="b1", host_name=OTHER, display_name="B", secret_hash="h", created_date_time=T0
        )
    )
    for app in (APP, OTHER):
        await store.put_audience(app, "a", None, 10, T0)
        await store.add_members(app, "a", ["u1", "u2"], 10)
        await store.start_send(send(f"s-{app}", app=app), ["u1"], 10)
        await store.send_progress(f"s-{app}", 1, [Failure("u1", "expired", "x")], "failed", T0)
        record = once("u2", scope=f":send:s-{app}")  # a recipient's record (herald/sends.py)
        await store.put_once("u2", app, content(target_host_name=app), new_id(), T0, record)
    counts = await store.delete_app(APP)
    assert counts is not None
    assert (counts["audiences"], counts["audienceMembers"], counts["sends"]) == (1, 2, 1)
    assert (counts["sendRecipients"], counts["sendFailures"], counts["sendRecords"]) == (1, 1, 1)
    assert await store.recall(f":send:s-{APP}", "u2", T0) is None
    assert await store.recall(f":send:s-{OTHER}", "u2", T0) is not None
    assert (
        await store.get_audience(APP, "a") is None and await store.get_send(APP, f"s-{APP}") is None
    )
    assert await store.send_recipients(f"s-{APP}", 0, 10) == []
    assert await store.members(OTHER, "a", None, 10) == ["u1", "u2"]
    assert await store.send_recipients(f"s-{OTHER}", 0, 10) == ["u1"]


async def test_finished_sends_are_pruned_after_their_retention(store: Store) -> None:
    """`prune_sends`: sends finished before the cut go, oldest first and `limit` at a time, with
    their recipients, failures and recipients' records; their key is free again. A send still
    running stays, however old."""
    early, late = T0 + timedelta(seconds=10), T0 + timedelta(seconds=20)
    for id, finished in (("s1", early), ("s2", late), ("s3", early), ("s4", None)):
        await store.start_send(send(id, key=f"k-{id}"), ["u1", "u2"], 10)
        failure = [Failure("u2", "userNotFound", "x")]
        await store.send_progress(id, 1, failure, "running", T0)
        if finished is not None:
            await store.send_progress(id, 2, [], "succeeded", finished)
        record = once("u1", scope=f":send:{id}")  # a recipient's record (herald/sends.py)
        await store.put_once("u1", APP, content(), new_id(), T0, record)
    cut = late  # s2 finished at the cut: kept
    assert await store.prune_sends(cut, 1) == 1
    assert await store.prune_sends(cut, 10) == 1
    assert await store.prune_sends(cut, 10) == 0
    for id in ("s1", "s3"):
        assert await store.get_send(APP, id) is None
        assert await store.send_recipients(id, 0, 10) == []
        assert await store.send_failures(APP, id, 10) == []
        assert await store.recall(f":send:{id}", "u1", T0) is None
    for id in ("s2", "s4"):
        kept = await store.get_send(APP, id)
        assert kept is not None and await store.send_recipients(id, 0, 10) == ["u1", "u2"]
        assert len(await store.send_failures(APP, id, 10)) == 1
        assert await store.recall(f":send:{id}", "u1", T0) is not None
    # The key of a pruned send makes a new send; a kept one's still answers with its own.
    _, created = await store.start_send(send("s5", key="k-s1"), ["u1"], 10)
    assert created
    _, created = await store.start_send(send("s6", key="k-s2"), ["u1"], 10)
    assert not created
    assert await store.prune_sends(T0 + timedelta(days=1), 10) == 1  # s2; s4..s6 not finished
    assert [s.id for s in await store.unfinished_sends(10)] == ["s4", "s5"]
