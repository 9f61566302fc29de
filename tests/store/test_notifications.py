"""The `Notifications` contract (herald/store/contract.py) on every backend: puts, reads, lists
and counts, updates and deletes, isolation by user and app, expiry."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from herald.errors import NotFound, PayloadTooLarge, PreconditionFailed
from herald.model import (
    ChangeKind,
    Payload,
    Platform,
    Priority,
    ReadState,
    StatePatch,
    TargetPolicy,
    UserActionState,
)
from herald.query import And, Comparison, Filter, In, Not, Or, Order, Query
from herald.store import Store

from .support import APP, OTHER_APP, T0, content, new_id, put


async def test_put_creates_then_replaces(store: Store) -> None:
    c = content(
        "a1",
        group_name="g",
        priority=Priority.HIGH,
        display_time_to_live=23,
        target_policy=TargetPolicy((Platform.IOS, Platform.WEBPUSH)),
        payload=Payload(raw_content="raw"),
    )
    first_id = new_id()
    n, created = await store.put("u1", APP, c, first_id, T0)
    assert created and n.id == first_id and n.version == 1
    assert n.created_date_time == n.last_modified_date_time == T0
    assert await store.get("u1", APP, n.id, T0) == n

    await store.update("u1", APP, n.id, StatePatch(read_state=ReadState.READ), None, T0)
    later = T0 + timedelta(seconds=5)
    c2 = content("a1", payload=Payload(raw_content="second"))
    n2, created2 = await store.put("u1", APP, c2, new_id(), later)
    assert not created2
    assert n2.id == first_id and n2.version == 3
    assert n2.created_date_time == T0 and n2.last_modified_date_time == later
    assert n2.read_state is ReadState.UNREAD and n2.user_action_state is UserActionState.NONE
    assert n2.payload == Payload(raw_content="second") and n2.group_name is None
    assert await store.get("u1", APP, first_id, later) == n2
    kinds = [c.kind for c in await store.changes("u1", APP, 0, 10)]
    assert kinds == [ChangeKind.CREATED, ChangeKind.UPDATED, ChangeKind.UPDATED]


async def test_app_notification_id_defaults_to_id(store: Store) -> None:
    nid, _ = await put(store)
    n = await store.get("u1", APP, nid, T0)
    assert n is not None and n.app_notification_id == nid


async def test_datetimes_round_trip_to_the_microsecond(store: Store) -> None:
    at = datetime(2030, 3, 4, 5, 6, 7, 999999, tzinfo=timezone_plus_two())
    exp = at + timedelta(days=1, microseconds=1)
    n, _ = await store.put("u1", APP, content("x", expiration_date_time=exp), new_id(), at)
    got = await store.get("u1", APP, n.id, at)
    assert got is not None
    assert got.created_date_time == at and got.created_date_time.utcoffset() == timedelta(0)
    assert got.expiration_date_time == exp


def timezone_plus_two() -> datetime.tzinfo:  # type: ignore[name-defined]

    return timezone(timedelta(hours=2))


async def test_put_over_expired_row_creates_a_new_one(store: Store) -> None:
    old, _ = await put(store, "a", expiration_date_time=T0 + timedelta(minutes=1))
    later = T0 + timedelta(minutes=2)
    fresh, created = await put(store, "a", at=later)
    assert created and fresh != old
    kinds = [(c.kind, c.notification_id) for c in await store.changes("u1", APP, 0, 10)]
    assert kinds == [
        (ChangeKind.CREATED, old),
        (ChangeKind.EXPIRED, old),
        (ChangeKind.CREATED, fresh),
    ]


async def test_isolation_by_user_and_app(store: Store) -> None:
    nid, _ = await put(store, "shared")
    for user, app in (("u2", APP), ("u1", OTHER_APP)):
        assert await store.get(user, app, nid, T0) is None
        assert (await store.list(user, app, Query(count=True), T0)).total == 0
        assert await store.count(user, app, None, T0) == 0
        with pytest.raises(NotFound):
            await store.update(user, app, nid, StatePatch(read_state=ReadState.READ), None, T0)
        with pytest.raises(NotFound):
            await store.delete(user, app, nid, None, T0)
        assert await store.changes(user, app, 0, 10) == []
    # The same appNotificationId elsewhere is a separate notification.
    other, created = await put(store, "shared", user="u2")
    assert created and other != nid
    third, created = await put(store, "shared", app=OTHER_APP)
    assert created and third not in (nid, other)
    n = await store.get("u1", APP, nid, T0)
    assert n is not None and n.version == 1
    assert [c.notification_id for c in await store.changes("u1", None, 0, 10)] == [nid, third]
    assert [c.notification_id for c in await store.changes("u1", OTHER_APP, 0, 10)] == [third]


async def _seed(store: Store) -> dict[str, str]:
    """Five notifications created one second apart; returns appNotificationId -> id."""
    specs = [
        ("n0", "g1", Priority.HIGH),
        ("n1", "g1", Priority.LOW),
        ("n2", "g2", Priority.NONE),
        ("n3", None, Priority.HIGH),
        ("n4", None, Priority.LOW),
    ]
    ids = {}
    for i, (anid, group, priority) in enumerate(specs):
        ids[anid], _ = await put(
            store, anid, at=T0 + timedelta(seconds=i), group_name=group, priority=priority
        )
    await store.update(
        "u1", APP, ids["n1"], StatePatch(read_state=ReadState.READ), None, T0 + timedelta(hours=1)
    )
    await store.update(
        "u1",
        APP,
        ids["n2"],
        StatePatch(user_action_state=UserActionState.DISMISSED),
        None,
        T0 + timedelta(hours=2),
    )
    await put(store, "other-user", user="u2", group_name="g1")
    await put(store, "other-app", app=OTHER_APP, group_name="g1")
    return ids


NOW = T0 + timedelta(days=1)


async def _anids(store: Store, query: Query) -> list[str]:
    page = await store.list("u1", APP, query, NOW)
    return [n.app_notification_id for n in page.items]


def _eq(field: str, value: object) -> Comparison:
    return Comparison(field, "eq", value)  # type: ignore[arg-type]


FILTERS: list[tuple[Filter, set[str]]] = [
    (_eq("group_name", "g1"), {"n0", "n1"}),
    (Comparison("group_name", "ne", "g1"), {"n2", "n3", "n4"}),
    (_eq("group_name", None), {"n3", "n4"}),
    (Comparison("group_name", "ne", None), {"n0", "n1", "n2"}),
    (Not(_eq("group_name", "g1")), {"n2", "n3", "n4"}),
    (Not(Comparison("group_name", "ne", "g1")), {"n0", "n1"}),
    (_eq("read_state", ReadState.READ), {"n1"}),
    (Comparison("read_state", "ne", ReadState.READ), {"n0", "n2", "n3", "n4"}),
    (_eq("user_action_state", UserActionState.DISMISSED), {"n2"}),
    (_eq("priority", Priority.HIGH), {"n0", "n3"}),
    (_eq("app_notification_id", "n3"), {"n3"}),
    (Comparison("created_date_time", "lt", T0 + timedelta(seconds=2)), {"n0", "n1"}),
    (Comparison("created_date_time", "le", T0 + timedelta(seconds=2)), {"n0", "n1", "n2"}),
    (Comparison("created_date_time", "gt", T0 + timedelta(seconds=2)), {"n3", "n4"}),
    (Comparison("created_date_time", "ge", T0 + timedelta(seconds=2)), {"n2", "n3", "n4"}),
    (Comparison("last_modified_date_time", "ge", T0 + timedelta(hours=1)), {"n1", "n2"}),
    (Comparison("expiration_date_time", "gt", T0), {"n0", "n1", "n2", "n3", "n4"}),
    (Comparison("created_date_time", "lt", None), set()),
    (And(_eq("group_name", "g1"), _eq("priority", Priority.LOW)), {"n1"}),
    (Or(_eq("group_name", "g2"), _eq("priority", Priority.LOW)), {"n1", "n2", "n4"}),
    (In("group_name", ("g2", None)), {"n2", "n3", "n4"}),
    (In("priority", (Priority.HIGH, Priority.NONE)), {"n0", "n2", "n3"}),
    (Not(In("group_name", ("g1",))), {"n2", "n3", "n4"}),
    (In("group_name", ()), set()),
]


async def test_list_filters(store: Store) -> None:
    await _seed(store)
    for f, expected in FILTERS:
        got = await _anids(store, Query(filter=f, count=True))
        assert set(got) == expected, f
        assert await store.count("u1", APP, f, NOW) == len(expected), f


async def test_list_filter_by_id(store: Store) -> None:
    ids = await _seed(store)
    assert await _anids(store, Query(filter=_eq("id", ids["n2"]))) == ["n2"]


async def test_list_order_skip_top_count(store: Store) -> None:
    await _seed(store)
    assert await _anids(store, Query()) == ["n4", "n3", "n2", "n1", "n0"]  # newest first
    asc = Query(order=(Order("created_date_time"),))
    assert await _anids(store, asc) == ["n0", "n1", "n2", "n3", "n4"]
    page = await store.list("u1", APP, Query(order=asc.order, skip=1, top=2, count=True), NOW)
    assert [n.app_notification_id for n in page.items] == ["n1", "n2"] and page.total == 5
    assert (await store.list("u1", APP, Query(top=2), NOW)).total is None
    # NULL group names sort first ascending, last descending; ties broken by id.
    by_group = await _anids(store, Query(order=(Order("group_name"), Order("app_notification_id"))))
    assert by_group == ["n3", "n4", "n0", "n1", "n2"]
    by_group_desc = await _anids(
        store, Query(order=(Order("group_name", descending=True), Order("app_notification_id")))
    )
    assert by_group_desc == ["n2", "n0", "n1", "n3", "n4"]
    modified = await _anids(store, Query(order=(Order("last_modified_date_time", True),), top=2))
    assert modified == ["n2", "n1"]


async def test_list_tie_break_is_id(store: Store) -> None:
    ids = sorted([(await put(store, f"t{i}"))[0] for i in range(6)])  # same created time
    page = await store.list("u1", APP, Query(), NOW)
    assert [n.id for n in page.items] == ids
    halves = [(await store.list("u1", APP, Query(top=3, skip=s), NOW)).items for s in (0, 3)]
    assert [n.id for n in halves[0] + halves[1]] == ids


async def test_update_state_and_content(store: Store) -> None:
    nid, _ = await put(store, "a", group_name="g")
    later = T0 + timedelta(minutes=1)
    n = await store.update(
        "u1",
        APP,
        nid,
        StatePatch(read_state=ReadState.READ, user_action_state=UserActionState.ACTIVATED),
        1,
        later,
    )
    assert (n.read_state, n.user_action_state, n.version) == (
        ReadState.READ,
        UserActionState.ACTIVATED,
        2,
    )
    assert n.last_modified_date_time == later and n.group_name == "g"
    exp = T0 + timedelta(days=2)
    n = await store.update(
        "u1",
        APP,
        nid,
        StatePatch(
            payload=Payload(raw_content="new"),
            priority=Priority.LOW,
            group_name="h",
            display_time_to_live=60,
            expiration_date_time=exp,
        ),
        None,
        later,
    )
    assert n.payload == Payload(raw_content="new") and n.priority is Priority.LOW
    assert (n.group_name, n.display_time_to_live, n.expiration_date_time) == ("h", 60, exp)
    assert n.read_state is ReadState.READ and n.version == 3
    assert await store.get("u1", APP, nid, later) == n
    # A patch that changes nothing is still a write.
    assert (await store.update("u1", APP, nid, StatePatch(), None, later)).version == 4


async def test_update_if_match(store: Store) -> None:
    nid, _ = await put(store, "a")
    with pytest.raises(PreconditionFailed):
        await store.update("u1", APP, nid, StatePatch(read_state=ReadState.READ), 7, T0)
    n = await store.get("u1", APP, nid, T0)
    assert n is not None and n.version == 1 and n.read_state is ReadState.UNREAD
    with pytest.raises(NotFound):
        await store.update("u1", APP, "missing", StatePatch(), None, T0)


async def test_delete_leaves_a_tombstone(store: Store) -> None:
    nid, _ = await put(store, "a")
    with pytest.raises(PreconditionFailed):
        await store.delete("u1", APP, nid, 2, T0)
    await store.delete("u1", APP, nid, 1, T0)
    assert await store.get("u1", APP, nid, T0) is None
    with pytest.raises(NotFound):
        await store.delete("u1", APP, nid, None, T0)
    changes = await store.changes("u1", APP, 0, 10)
    assert [(c.position, c.kind) for c in changes] == [
        (1, ChangeKind.CREATED),
        (2, ChangeKind.DELETED),
    ]
    assert changes[0].notification is None  # deleted since
    assert changes[1].notification is None and changes[1].notification_id == nid
    assert changes[1].at == T0 and changes[1].app == APP


async def test_delete_group(store: Store) -> None:
    ids = await _seed(store)
    assert await store.delete_group("u1", APP, "g1", NOW) == 2
    assert set(await _anids(store, Query())) == {"n2", "n3", "n4"}
    assert await store.delete_group("u1", APP, "g1", NOW) == 0
    tombstones = [c for c in await store.changes("u1", APP, 0, 100) if c.kind == "deleted"]
    assert {c.notification_id for c in tombstones} == {ids["n0"], ids["n1"]}
    # Other users' and apps' g1 rows are untouched.
    assert await store.count("u2", APP, None, NOW) == 1
    assert await store.count("u1", OTHER_APP, None, NOW) == 1


async def test_expired_rows_are_invisible_before_sweep(store: Store) -> None:
    nid, _ = await put(store, "a", expiration_date_time=T0 + timedelta(minutes=1))
    at = T0 + timedelta(minutes=1)
    assert await store.get("u1", APP, nid, at) is None
    assert (await store.list("u1", APP, Query(count=True), at)).total == 0
    assert await store.count("u1", APP, None, at) == 0
    with pytest.raises(NotFound):
        await store.update("u1", APP, nid, StatePatch(), None, at)
    with pytest.raises(NotFound):
        await store.delete("u1", APP, nid, None, at)
    assert await store.delete_group("u1", APP, "g", at) == 0


async def test_open_properties_are_stored_and_merged(store: Store) -> None:
    n, _ = await store.put("u1", APP, content("x", extra=b'{"a":1,"b":[1,2]}'), new_id(), T0)
    assert n.extra == b'{"a":1,"b":[1,2]}'
    stored = await store.get("u1", APP, n.id, T0)
    assert stored is not None and stored.extra == n.extra
    patch = StatePatch(extra=b'{"b":null,"c":"x"}', max_extra_bytes=100)
    after = await store.update("u1", APP, n.id, patch, None, T0)
    assert after.extra == b'{"a":1,"c":"x"}'
    too_big = StatePatch(extra=b'{"d":"' + b"x" * 100 + b'"}', max_extra_bytes=100)
    with pytest.raises(PayloadTooLarge):
        await store.update("u1", APP, n.id, too_big, None, T0)
    cleared = await store.update(
        "u1", APP, n.id, StatePatch(extra=b'{"a":null,"c":null}'), None, T0
    )
    assert cleared.extra is None
    [change] = await store.changes("u1", APP, 2, 10)
    assert change.kind is ChangeKind.UPDATED and change.notification is not None
    assert change.notification.extra is None
