"""What the contract suite's files share: the clock and apps they use, and ways to build the
records they start from."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import msgspec

from herald.model import (
    ApnsChannel,
    ChangeKind,
    Content,
    Delivery,
    DeliveryState,
    DevicePlatform,
    FcmChannel,
    Message,
    NewDelivery,
    Notification,
    Payload,
    Pending,
    Provider,
    PushChannel,
    PushKind,
    Settle,
    Settlement,
    Subscription,
    VisualContent,
    WebPushChannel,
    WebPushKeys,
    WnsChannel,
)
from herald.query import Query
from herald.store import Once, Remembered, Store
from herald.store.rows import to_micros
from herald.store.sqlite import SqliteStore

from .conftest import Backend

T0 = datetime(2030, 1, 1, 12, 0, 0, 123456, tzinfo=UTC)


APP = "app.example.com"


OTHER_APP = "other.example.com"


LATER = T0 + timedelta(days=30)


LEASE = 30.0


SOON = T0 + timedelta(seconds=LEASE)


replace = msgspec.structs.replace


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


def log_of(pending: list[Pending]) -> list[tuple[str, int, ChangeKind, str, str | None]]:
    return [
        (
            p.change.user_id,
            p.change.position,
            p.change.kind,
            p.change.notification_id,
            p.change.origin,
        )
        for p in pending
    ]


def assert_ascending(pending: list[Pending]) -> None:
    seqs = [p.seq for p in pending]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


def subscription(
    user: str = "u1",
    app: str = APP,
    channel: PushChannel | None = None,
    platform: DevicePlatform = DevicePlatform.LIVE,
    at: datetime = T0,
    expires: datetime = LATER,
    name: str | None = "laptop",
) -> Subscription:
    return Subscription(
        id=new_id(),
        user_id=user,
        app=app,
        platform=platform,
        display_name=name,
        push_channel=channel,
        expiration_date_time=expires,
        created_date_time=at,
        last_modified_date_time=at,
    )


def web_push(endpoint: str = "https://push.example.net/ep1") -> WebPushChannel:
    return WebPushChannel(endpoint=endpoint, keys=WebPushKeys(p256dh="pk", auth="au"))


CHANNELS: list[tuple[DevicePlatform, PushChannel]] = [
    (DevicePlatform.WEBPUSH, web_push()),
    (DevicePlatform.IOS, ApnsChannel(device_token="ab" * 32)),
    (DevicePlatform.ANDROID, FcmChannel(registration_token="fcm-token")),
    (DevicePlatform.WINDOWS, WnsChannel(channel_uri="https://wns.example.net/ch")),
]


def message(position: int = 1, expires: datetime = T0 + timedelta(days=7), **kw: object) -> Message:
    fields: dict[str, object] = {
        "kind": PushKind.ALERT,
        "notification_id": f"n{position}",
        "app_notification_id": f"a{position}",
        "position": position,
        "expires": expires,
    }
    fields.update(kw)
    return Message(**fields)  # type: ignore[arg-type]


def new_delivery(
    sub: Subscription,
    position: int = 1,
    due: datetime = T0,
    provider: Provider = Provider.WEBPUSH,
    **kw: object,
) -> NewDelivery:
    return NewDelivery(
        subscription_id=sub.id,
        user_id=sub.user_id,
        app=sub.app,
        provider=provider,
        message=message(position, **kw),
        due=due,
    )


async def web_sub(
    store: Store, user: str = "u1", endpoint: str = "https://push.example.net/1", **kw: object
) -> Subscription:
    sub = subscription(user=user, channel=web_push(endpoint), platform=DevicePlatform.WEBPUSH)
    sub = replace(sub, **kw)
    stored, created = await store.add_subscription(sub, 100, T0)
    assert created
    return stored


async def outbox_entries(store: Store, keys: list[tuple[str, int]]) -> list[int]:
    """Outbox entries for these (user_id, position) pairs, written behind the store's back and
    without changes behind them (so `pending` skips them and they supersede nothing): the
    queue tests choose any positions they like, again and again."""
    if isinstance(store, SqliteStore):
        assert store._conn is not None
        sql = "INSERT INTO outbox (user_id, position) VALUES (?, ?) RETURNING seq"
        return [store._conn.execute(sql, key).fetchall()[0][0] for key in keys]
    from herald.store.postgres import PostgresStore

    assert isinstance(store, PostgresStore)
    async with store._acquire() as conn:
        rows = await conn.fetch(
            "INSERT INTO outbox (user_id, position)"
            " SELECT * FROM unnest($1::text[], $2::bigint[]) RETURNING seq",
            [k[0] for k in keys],
            [k[1] for k in keys],
        )
    return [r[0] for r in rows]


async def enqueue(store: Store, *deliveries: NewDelivery) -> None:
    """Queue these deliveries, whatever their positions (see `outbox_entries`)."""
    keys = sorted({(d.user_id, d.message.position) for d in deliveries})
    await store.dispatched(await outbox_entries(store, keys), deliveries)


async def state(store: Store, sub: Subscription) -> DeliveryState:
    got = await store.get_subscription(sub.id, T0)
    assert got is not None
    return got.delivery


def positions(claimed: list[Delivery]) -> list[int]:
    return [d.message.position for d in claimed]


async def claim_all(store: Store, now: datetime = T0) -> list[Delivery]:
    return await store.claim(Provider.WEBPUSH, now, LEASE, 1000)


def outcome(d: Delivery, settle: Settle, **kw: object) -> Settlement:
    fields: dict[str, object] = {
        "id": d.id,
        "subscription_id": d.subscription_id,
        "settle": settle,
        "attempts": d.attempts,
        "channel_key": d.channel.key,
    }
    fields.update(kw)
    return Settlement(**fields)  # type: ignore[arg-type]


async def fetch(store: Store, sub: Subscription) -> Subscription:
    got = await store.get_subscription(sub.id, T0)
    assert got is not None
    return got


async def failing(store: Store, sub: Subscription) -> Subscription:
    """Give `sub` a delivery history: a delivery, then two failures and gone."""
    await enqueue(store, *(new_delivery(sub, i) for i in range(3)))
    d1, d2, d3 = await claim_all(store)
    await store.settle([outcome(d1, Settle.DONE, sent=True)], T0)
    await store.settle([outcome(d2, Settle.DROP, error="x"), outcome(d3, Settle.GONE)], T0)
    got = await fetch(store, sub)
    assert got.delivery == DeliveryState(
        last_delivered_date_time=T0, consecutive_failures=2, gone_date_time=T0
    )
    return got


async def remembered(
    store: Store,
    scope: str,
    key: str,
    fingerprint: str,
    status: int,
    body: bytes,
    location: str | None,
    expires: datetime,
) -> None:
    """An Idempotency-Key record written behind the store's back, as another process or node
    (or an older Herald) left it: the store writes records only with their notification
    (`put_once`), and these tests need one on its own."""
    values = (scope, key, fingerprint, status, body, location)
    from herald.store.sqlite import SqliteStore

    if isinstance(store, SqliteStore):
        assert store._conn is not None
        store._conn.execute(
            "INSERT INTO idempotency VALUES (?, ?, ?, ?, ?, ?, ?)", (*values, to_micros(expires))
        )
        return
    from herald.store.postgres import PostgresStore

    assert isinstance(store, PostgresStore)
    async with store._acquire() as conn:
        await conn.execute(
            "INSERT INTO idempotency VALUES ($1, $2, $3, $4, $5, $6, $7)", *values, expires
        )


@contextlib.asynccontextmanager
async def two_nodes(backend: Backend) -> AsyncIterator[tuple[Store, Store]]:
    """Two open stores on one database, as two Herald nodes (or a server and the CLI) have."""
    a, b = backend.make(), backend.make()
    await a.open()
    await b.open()
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()
