"""`ChangeFeed` and `Webhooks`: each app's change feed, in one order for all its users, and its
webhooks' delivery state."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import msgspec
import pytest

from herald.errors import Conflict, NotFound, QuotaExceeded
from herald.model import ChangeKind, ReadState, StatePatch, UserActionState
from herald.store import Store, Webhook

from .conftest import Backend
from .support import APP, OTHER_APP, T0, content, new_id, put, two_nodes

DAY = timedelta(days=1)


async def feed_of(store: Store, app: str = APP, after: int = 0) -> list[tuple[int, str, int, str]]:
    """(seq, user, position, kind) of every entry after `after`, read a few at a time."""
    found = []
    while True:
        page = await store.app_changes(app, after, 3)
        found += [(seq, c.user_id, c.position, str(c.kind)) for seq, c in page.entries]
        assert page.cursor >= after
        if not page.more:
            return found
        after = page.cursor


async def test_only_the_changes_of_an_enabled_app_are_recorded(store: Store) -> None:
    await put(store, "before")
    await store.enable_feed(OTHER_APP, T0)
    await put(store, "unrecorded")  # APP has not enabled its feed
    assert await feed_of(store) == []
    await store.enable_feed(APP, T0)
    await store.enable_feed(APP, T0)  # idempotent
    await put(store, "after")
    assert [(user, position) for _, user, position, _ in await feed_of(store)] == [("u1", 3)]
    w = await store.add_webhook(hook(app=OTHER_APP), limit=5)  # enables the app's feed too
    await put(store, "x", app=OTHER_APP, target_host_name=OTHER_APP)
    assert [seq for seq, *_ in await feed_of(store, OTHER_APP)] == [w.cursor + 1]


async def test_every_kind_of_change_is_in_the_feed_in_commit_order(store: Store) -> None:
    await store.enable_feed(APP, T0)
    await store.enable_feed(OTHER_APP, T0)
    a, _ = await put(store, "a", user="u1")
    await put(store, "x", user="u1", app=OTHER_APP, target_host_name=OTHER_APP)
    b, _ = await put(store, "b", user="u2", expiration_date_time=T0 + DAY)
    await store.update("u1", APP, a, StatePatch(read_state=ReadState.READ), None, T0)
    await store.update(
        "u1", APP, a, StatePatch(user_action_state=UserActionState.DISMISSED), None, T0
    )
    await put(store, "a", user="u1")  # replaces: an update with new content
    await store.delete("u1", APP, a, None, T0)
    assert await store.sweep(T0 + 2 * DAY, T0 - DAY, 100) == 1  # b expires

    feed = await feed_of(store)
    assert [(user, position, kind) for _, user, position, kind in feed] == [
        ("u1", 1, "created"),
        ("u2", 1, "created"),
        ("u1", 3, "updated"),
        ("u1", 4, "updated"),
        ("u1", 5, "updated"),
        ("u1", 6, "deleted"),
        ("u2", 2, "expired"),
    ]
    seqs = [seq for seq, *_ in feed]
    assert seqs == sorted(set(seqs))
    assert (await store.feed_bounds())[1] >= seqs[-1]
    entries = (await store.app_changes(APP, 0, 100)).entries
    replaced = [c for _, c in entries if c.replaced]
    assert len(replaced) == 1 and replaced[0].notification is None  # deleted since
    other = await feed_of(store, OTHER_APP)
    assert [(user, position, kind) for _, user, position, kind in other] == [("u1", 2, "created")]
    assert b not in {c.notification_id for _, c in entries if c.kind is ChangeKind.CREATED} - {b}


async def test_a_read_from_a_cursor_returns_only_what_follows(store: Store) -> None:
    await store.enable_feed(APP, T0)
    await store.enable_feed(OTHER_APP, T0)
    for i in range(5):
        await put(store, f"n{i}", user=f"u{i % 2}")
    first = await store.app_changes(APP, 0, 2)
    assert len(first.entries) == 2 and first.cursor == first.entries[-1][0] and first.more
    await put(store, "other", app=OTHER_APP, target_host_name=OTHER_APP)
    rest = await store.app_changes(APP, first.cursor, 100)
    assert not rest.more
    seqs = [seq for seq, _ in first.entries + rest.entries]
    assert seqs == [seq for seq, *_ in await feed_of(store)]
    # Not full: the cursor is the feed's head, past the other app's entry.
    assert rest.cursor == (await store.feed_bounds())[1] > seqs[-1]
    end = await store.app_changes(APP, rest.cursor, 100)
    assert (end.entries, end.cursor, end.more) == ([], rest.cursor, False)


async def test_two_nodes_writing_at_once_give_each_user_their_order(
    durable_backend: Backend,
) -> None:
    async with two_nodes(durable_backend) as (a, b):
        await a.enable_feed(APP, T0)

        async def post(node: Store, i: int) -> None:
            user = f"u{i % 5}"
            await node.put(user, APP, content(f"n{i}"), new_id(), T0)

        await asyncio.gather(*(post(a if i % 2 else b, i) for i in range(100)))
        feed = await feed_of(a)
        assert len(feed) == 100
        assert len({seq for seq, *_ in feed}) == 100
        for u in range(5):
            positions = [p for _, user, p, _ in feed if user == f"u{u}"]
            assert positions == list(range(1, 21))
        assert await feed_of(b) == feed


async def test_pruning_keeps_the_newest_entry_and_moves_the_horizon(store: Store) -> None:
    await store.enable_feed(APP, T0)
    for i in range(3):
        await put(store, f"n{i}", at=T0 + i * DAY)
    seqs = [seq for seq, *_ in await feed_of(store)]
    assert await store.prune_feed(T0 + DAY + timedelta(seconds=1)) == 2
    assert await store.feed_bounds() == (seqs[1], seqs[2])
    assert [seq for seq, *_ in await feed_of(store)] == [seqs[2]]
    assert await store.prune_feed(T0 + 10 * DAY) == 0  # the newest stays: seqs go on from it
    await put(store, "n3")
    assert [seq for seq, *_ in await feed_of(store)][-1] > seqs[2]


async def test_an_entry_whose_change_was_pruned_is_skipped(store: Store) -> None:
    await store.enable_feed(APP, T0)
    await put(store, "old", at=T0)
    await put(store, "new", at=T0 + 2 * DAY)
    await store.sweep(T0 + 2 * DAY, T0 + DAY, 100)  # prunes the first change from the log
    page = await store.app_changes(APP, 0, 1)  # the pruned entry: skipped, but more follow
    assert page.entries == [] and page.more
    page = await store.app_changes(APP, page.cursor, 1)
    assert [c.position for _, c in page.entries] == [2]


def hook(id: str = "w1", app: str = APP, **kw: object) -> Webhook:
    fields: dict[str, object] = {
        "id": id,
        "app": app,
        "url": "https://hooks.example.net/h",
        "secret": "whsec_c2VjcmV0",
        "kinds": ("created", "updated"),
        "status": "active",
        "cursor": 0,
        "created": T0,
        "last_modified": T0,
    }
    return Webhook(**(fields | kw))  # type: ignore[arg-type]


async def test_a_new_webhook_starts_at_the_head_of_the_feed(store: Store) -> None:
    await store.enable_feed(OTHER_APP, T0)
    await put(store, "before", app=OTHER_APP, target_host_name=OTHER_APP)
    _, head = await store.feed_bounds()
    added = await store.add_webhook(hook(), limit=2)
    assert added.cursor == head > 0 and added.kinds == ("created", "updated")
    assert await store.get_webhook(APP, "w1") == added
    assert await store.get_webhook(OTHER_APP, "w1") is None
    with pytest.raises(Conflict):
        await store.add_webhook(hook(), limit=2)
    await store.add_webhook(hook("w2"), limit=2)
    with pytest.raises(QuotaExceeded):
        await store.add_webhook(hook("w3"), limit=2)
    assert [h.id for h in await store.list_webhooks(APP)] == ["w1", "w2"]
    assert await store.list_webhooks(OTHER_APP) == []


async def test_delivery_state_moves_only_from_the_cursor_it_was_read_at(store: Store) -> None:
    w = await store.add_webhook(hook(), limit=5)
    start = w.cursor
    await put(store, "a")  # something to deliver: it is due
    assert await store.webhook_failed("w1", start, T0, 500, "HTTP 500", T0 + DAY, False)
    assert not await store.webhook_failed("w1", start + 1, T0, 500, "stale", T0, False)
    failed = await store.get_webhook(APP, "w1")
    assert failed is not None and failed.failures == 1 and failed.failing_since == T0
    assert failed.last_status == 500 and failed.next_attempt == T0 + DAY
    assert await store.due_webhooks(T0) == []
    assert [h.id for h in await store.due_webhooks(T0 + DAY)] == ["w1"]
    later = T0 + timedelta(minutes=1)
    assert await store.webhook_failed("w1", start, later, None, "timed\nout\0", later, False)
    assert await store.webhook_delivered("w1", start, start + 7, later, 204)
    assert not await store.webhook_delivered("w1", start, start + 9, later, 204)  # moved on
    done = await store.get_webhook(APP, "w1")
    assert done is not None and done.cursor == start + 7 and done.failures == 0
    assert done.failing_since is None and done.next_attempt is None
    assert done.last_status == 204 and done.last_success == later and done.last_error is None
    assert await store.webhook_failed("w1", start + 7, later, 503, "x", later, give_up=True)
    gave_up = await store.get_webhook(APP, "w1")
    assert gave_up is not None and gave_up.status == "failed"
    assert await store.due_webhooks(later) == []
    again = msgspec.structs.replace(
        gave_up, status="active", failures=0, failing_since=None, next_attempt=None
    )
    assert (await store.update_webhook(again)).status == "active"
    with pytest.raises(NotFound):
        await store.update_webhook(hook("nope"))
    assert await store.delete_webhook(APP, "w1")
    assert not await store.delete_webhook(APP, "w1")


async def test_only_a_webhook_with_changes_after_its_cursor_is_due(store: Store) -> None:
    assert not await store.webhooks_active()
    mine = await store.add_webhook(hook("w1"), limit=5)
    theirs = await store.add_webhook(hook("w2", app=OTHER_APP), limit=5)
    assert await store.webhooks_active()
    assert await store.due_webhooks(T0) == []  # nothing after either cursor
    await put(store, "x", app=OTHER_APP, target_host_name=OTHER_APP)
    assert [h.id for h in await store.due_webhooks(T0)] == ["w2"]  # not the other app's
    page = await store.app_changes(OTHER_APP, theirs.cursor, 100)
    assert await store.webhook_delivered("w2", theirs.cursor, page.cursor, T0, 200)
    assert await store.due_webhooks(T0) == []
    await put(store, "a")
    assert [h.id for h in await store.due_webhooks(T0)] == ["w1"]
    off = msgspec.structs.replace(mine, status="disabled")
    await store.update_webhook(off)
    assert await store.due_webhooks(T0) == []
    await store.delete_webhook(OTHER_APP, "w2")
    assert not await store.webhooks_active()  # a disabled one is not active


async def test_an_error_is_stored_printable(store: Store) -> None:
    w = await store.add_webhook(hook(), limit=5)
    await store.webhook_failed("w1", w.cursor, T0, None, "bad\0\nthing" * 100, T0, False)
    stored = await store.get_webhook(APP, "w1")
    assert stored is not None and stored.last_error is not None
    assert stored.last_error.isprintable() and len(stored.last_error) <= 1000


async def test_deleting_an_app_takes_its_feed_and_webhooks(store: Store) -> None:
    from herald.model import App

    app = App(
        client_id="c1", host_name=APP, display_name="A", secret_hash="h", created_date_time=T0
    )
    await store.add_app(app)
    await store.add_webhook(hook(), limit=5)
    await put(store, "a")
    assert len(await feed_of(store)) == 1
    counts = await store.delete_app(APP)
    assert counts is not None and counts["changeFeed"] == 1 and counts["webhooks"] == 1
    assert counts["changeFeedEnabled"] == 1
    assert await feed_of(store) == []
    assert await store.list_webhooks(APP) == []
