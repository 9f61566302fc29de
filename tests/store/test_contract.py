"""The Store contract (herald/store/base.py), checked through its interface on every backend."""

from __future__ import annotations

import asyncio
import pathlib
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from herald.errors import Conflict, HeraldError, NotFound, PreconditionFailed
from herald.model import (
    App,
    ChangeKind,
    Content,
    Notification,
    Payload,
    Platform,
    Priority,
    ReadState,
    StatePatch,
    TargetPolicy,
    UserActionState,
    VisualContent,
)
from herald.query import And, Comparison, Filter, In, Not, Or, Order, Query
from herald.store import Once, Remembered, Store
from herald.store.schema import SchemaTooNew

from .conftest import Backend
from .support import remembered

T0 = datetime(2030, 1, 1, 12, 0, 0, 123456, tzinfo=UTC)
APP = "app.example.com"
OTHER_APP = "other.example.com"


def content(anid: str | None = None, **kw: object) -> Content:
    fields: dict[str, object] = {
        "target_host_name": APP,
        "app_notification_id": anid,
        "payload": Payload(visual_content=VisualContent(title="hi", body="there")),
        "expiration_date_time": T0 + timedelta(days=7),
    }
    fields.update(kw)
    return Content(**fields)  # type: ignore[arg-type]


def new_id() -> str:
    return str(uuid.uuid4())


async def put(
    store: Store,
    anid: str | None = None,
    user: str = "u1",
    app: str = APP,
    at: datetime = T0,
    **kw: object,
) -> tuple[str, bool]:
    n, created = await store.put(user, app, content(anid, **kw), new_id(), at)
    return n.id, created


# -- put ---------------------------------------------------------------------------------------


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
    from datetime import timezone

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


# -- isolation ---------------------------------------------------------------------------------


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


# -- list / count ------------------------------------------------------------------------------


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


# -- update / delete ---------------------------------------------------------------------------


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


# -- change log --------------------------------------------------------------------------------


async def test_changes_carry_current_state_and_page(store: Store) -> None:
    nid, _ = await put(store, "a")
    await store.update("u1", APP, nid, StatePatch(read_state=ReadState.READ), None, T0)
    other, _ = await put(store, "b")
    changes = await store.changes("u1", APP, 0, 10)
    assert [c.position for c in changes] == [1, 2, 3]
    assert changes[0].notification == changes[1].notification
    assert changes[0].notification is not None
    assert changes[0].notification.read_state is ReadState.READ
    assert [c.position for c in await store.changes("u1", APP, 1, 1)] == [2]
    assert await store.changes("u1", APP, 3, 10) == []
    assert await store.horizon("u1") == (0, 3)
    assert await store.horizon("nobody") == (0, 0)
    assert other


async def test_positions_gap_free_under_concurrency(store: Store) -> None:
    users = [f"user{i:02d}" for i in range(20)]
    results = await asyncio.gather(
        *(store.put(users[i % 20], APP, content(f"k{i % 60}"), new_id(), T0) for i in range(500))
    )
    assert len(results) == 500
    for user in users:
        changes = await store.changes(user, None, 0, 1000)
        assert [c.position for c in changes] == list(range(1, 26))
        assert await store.horizon(user) == (0, 25)
        # 3 distinct keys per user: 3 creates, the rest replaces, versions sum to 25.
        page = await store.list(user, APP, Query(count=True), T0)
        assert page.total == 3 and sum(n.version for n in page.items) == 25
        assert sum(c.kind == ChangeKind.CREATED for c in changes) == 3


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


# -- expiry and sweep --------------------------------------------------------------------------


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


async def test_sweep_expires_prunes_and_moves_horizon(store: Store) -> None:
    soon = T0 + timedelta(minutes=1)
    expiring = [(await put(store, f"e{i}", expiration_date_time=soon))[0] for i in range(3)]
    keeper, _ = await put(store, "k", at=T0 + timedelta(minutes=5))
    other, _ = await put(store, "o", user="u2", expiration_date_time=soon)
    now = T0 + timedelta(minutes=10)
    assert await store.sweep(now, T0, limit=2) == 2
    assert await store.sweep(now, T0, limit=100) == 2
    assert await store.sweep(now, T0, limit=100) == 0
    changes = await store.changes("u1", APP, 0, 100)
    assert [c.kind for c in changes[4:]] == [ChangeKind.EXPIRED] * 3
    assert {c.notification_id for c in changes[4:]} == set(expiring)
    assert [c.position for c in changes] == list(range(1, 8))
    assert changes[3].notification is not None and changes[3].notification_id == keeper
    # Prune everything recorded before T0 + 2 minutes: the first three creates.
    assert await store.sweep(now, T0 + timedelta(minutes=2), limit=100) == 0
    assert await store.horizon("u1") == (3, 7)
    assert [c.position for c in await store.changes("u1", APP, 0, 100)] == [4, 5, 6, 7]
    assert await store.horizon("u2") == (1, 2)
    assert [c.kind for c in await store.changes("u2", APP, 0, 10)] == [ChangeKind.EXPIRED]
    assert other


async def test_sweep_drops_expired_idempotency_rows(store: Store) -> None:
    await remembered(store, "s", "k", "fp", 201, b"{}", None, T0 + timedelta(minutes=1))
    await store.sweep(T0 + timedelta(minutes=2), T0, 10)
    assert await store.recall("s", "k", T0) is None


# -- idempotency -------------------------------------------------------------------------------


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


def once(key: str = "k", fingerprint: str = "fp", **kw: object) -> Once:
    """A key whose answer is rendered from the notification as stored (a stand-in for the API's
    JSON body: the id, version and creation flag are what differ between answers)."""

    def render(n: Notification, created: bool) -> Remembered:
        body = f"{n.id} v{n.version} {n.app_notification_id}".encode()
        return Remembered(fingerprint, 201 if created else 200, body, n.id if created else None)

    fields: dict[str, object] = {"scope": "app1:u1", "key": key, "fingerprint": fingerprint}
    fields |= {"expires": T0 + timedelta(hours=1), "render": render, **kw}
    return Once(**fields)  # type: ignore[arg-type]


async def notifications(store: Store, user: str = "u1") -> list[Notification]:
    return (await store.list(user, APP, Query(top=100), T0)).items


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
    a, b = durable_backend.make(), durable_backend.make()
    await a.open()
    await b.open()
    try:
        first = await a.put_once("u1", APP, content(), new_id(), T0, once())
        second = await b.put_once("u1", APP, content(), new_id(), T0, once(fingerprint="fp2"))
        assert second == first
        assert len(await notifications(b)) == 1
    finally:
        await a.close()
        await b.close()


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


# -- apps --------------------------------------------------------------------------------------


async def test_apps(store: Store) -> None:
    b = App(
        client_id="cb",
        host_name="b.example",
        display_name="B",
        secret_hash="x",
        created_date_time=T0,
    )
    a = App(
        client_id="ca",
        host_name="a.example",
        display_name="A",
        secret_hash="y",
        created_date_time=T0 + timedelta(microseconds=1),
    )
    await store.add_app(b)
    await store.add_app(a)
    assert await store.get_app("ca") == a
    assert await store.get_app("nope") is None
    assert await store.list_apps() == [a, b]
    with pytest.raises(Conflict):
        await store.add_app(
            App(
                client_id="ca",
                host_name="c.example",
                display_name="C",
                secret_hash="z",
                created_date_time=T0,
            )
        )
    with pytest.raises(Conflict):
        await store.add_app(
            App(
                client_id="cc",
                host_name="a.example",
                display_name="C",
                secret_hash="z",
                created_date_time=T0,
            )
        )


# -- lifecycle ---------------------------------------------------------------------------------


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
    a, b = backend.make(), backend.make()
    await a.open()
    await b.open()
    try:
        await asyncio.gather(
            *(s.put("u1", APP, content(f"k{i}"), new_id(), T0) for i in range(100) for s in (a, b))
        )
        assert [c.position for c in await a.changes("u1", APP, 0, 500)] == list(range(1, 201))
    finally:
        await a.close()
        await b.close()


async def test_refuses_a_newer_schema(durable_backend: Backend) -> None:
    backend = durable_backend
    store = backend.make()
    await store.open()
    await _bump_schema_version(backend, store)
    await store.close()
    again = backend.make()
    with pytest.raises(SchemaTooNew, match="newer"):
        await again.open()
    await again.close()


async def _bump_schema_version(backend: Backend, store: Store) -> None:
    if backend.name == "postgres":
        from herald.store.postgres import PostgresStore

        assert isinstance(store, PostgresStore)
        async with store._acquire() as conn:
            await conn.execute("INSERT INTO schema_version VALUES (9999)")
        return
    import sqlite3

    from herald.store.sqlite import SqliteStore

    assert isinstance(store, SqliteStore)
    with sqlite3.connect(store._database) as conn:
        conn.execute("INSERT INTO schema_version VALUES (9999)")
    conn.close()


async def test_sqlite_url_options(tmp_path: pathlib.Path) -> None:
    from herald.store.sqlite import SqliteStore

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
