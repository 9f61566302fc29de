"""How records are laid out in rows, for both backends: the column lists every SELECT uses, the
row -> model mappers, the encoded columns (content, push channel, message) and the time
conversions."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import msgspec

from herald.model import (
    PROVIDER_OF,
    App,
    Change,
    ChangeKind,
    DeliveryState,
    DevicePlatform,
    FallbackPolicy,
    Message,
    Notification,
    Payload,
    Pending,
    Priority,
    Provider,
    PushChannel,
    ReadState,
    Subscription,
    TargetPolicy,
    UserActionState,
)

# Column order of every `SELECT {NOTIFICATION_COLUMNS}`; `notification_from_row` relies on it.
NOTIFICATION_COLUMNS = (
    "id, user_id, app, app_notification_id, target_host_name, group_name, priority, read_state,"
    " user_action_state, created_date_time, last_modified_date_time, expiration_date_time,"
    " version, content"
)


class StoredContent(msgspec.Struct, frozen=True, array_like=True):
    """The app-set content nobody filters on, kept as one encoded column."""

    payload: Payload
    target_policy: TargetPolicy
    fallback_policy: FallbackPolicy | None
    display_time_to_live: int | None
    # Open-type properties (JSON object text); a trailing default, so rows written before it
    # existed still decode.
    extra: bytes | None = None


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(StoredContent)


def encode_content(n: Notification) -> bytes:
    return _encoder.encode(
        StoredContent(
            n.payload, n.target_policy, n.fallback_policy, n.display_time_to_live, n.extra
        )
    )


def notification_values(n: Notification, to_db: Callable[[datetime], Any]) -> tuple[object, ...]:
    """The columns of `n` in `NOTIFICATION_COLUMNS` order, datetimes as `to_db` stores them
    (enums are StrEnums: both drivers bind them as their text)."""
    return (
        n.id,
        n.user_id,
        n.app,
        n.app_notification_id,
        n.target_host_name,
        n.group_name,
        n.priority,
        n.read_state,
        n.user_action_state,
        to_db(n.created_date_time),
        to_db(n.last_modified_date_time),
        to_db(n.expiration_date_time),
        n.version,
        encode_content(n),
    )


def notification_from_row(row: Sequence[Any], to_dt: Callable[[Any], datetime]) -> Notification:
    c = _decoder.decode(row[13])
    return Notification(
        id=row[0],
        user_id=row[1],
        app=row[2],
        app_notification_id=row[3],
        target_host_name=row[4],
        group_name=row[5],
        priority=Priority(row[6]),
        read_state=ReadState(row[7]),
        user_action_state=UserActionState(row[8]),
        created_date_time=to_dt(row[9]),
        last_modified_date_time=to_dt(row[10]),
        expiration_date_time=to_dt(row[11]),
        version=row[12],
        payload=c.payload,
        target_policy=c.target_policy,
        fallback_policy=c.fallback_policy,
        display_time_to_live=c.display_time_to_live,
        extra=c.extra,
    )


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def to_micros(dt: datetime) -> int:
    """Aware datetime -> integer microseconds since the epoch (exact, sortable)."""
    return (dt - _EPOCH) // _MICROSECOND


def from_micros(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def as_utc(dt: datetime) -> datetime:
    return dt.astimezone(UTC)


# -- change log ------------------------------------------------------------------------------

# Column order of a change row as `change_from_row` reads it (then the notification's columns).
CHANGE_COLUMNS = ("position", "kind", "app", "notification_id", "at", "origin")
# The stored kind of an UPDATED change made by a put that replaced a live notification (read back
# as UPDATED with `replaced`). Every other change is stored as its ChangeKind's value.
REPLACED = "replaced"
# The stored kinds whose change carries the notification as it is now.
LIVE_KINDS = f"('{ChangeKind.CREATED.value}', '{ChangeKind.UPDATED.value}', '{REPLACED}')"


def change_from_row(user_id: str, r: Sequence[Any], to_dt: Callable[[Any], datetime]) -> Change:
    """A change-log row (position, kind, app, notification id, at, origin, *notification
    columns)."""
    replaced = r[1] == REPLACED
    return Change(
        user_id=user_id,
        position=r[0],
        kind=ChangeKind.UPDATED if replaced else ChangeKind(r[1]),
        replaced=replaced,
        app=r[2],
        notification_id=r[3],
        at=to_dt(r[4]),
        origin=r[5],
        notification=None if r[6] is None else notification_from_row(r[6:], to_dt),
    )


def pending_from_row(r: Sequence[Any], to_dt: Callable[[Any], datetime]) -> Pending:
    """An outbox row (seq, user id, *change row as `change_from_row` reads it, pushable)."""
    return Pending(r[0], change_from_row(r[1], r[2:-1], to_dt), bool(r[-1]))


# -- subscriptions and apps --------------------------------------------------------------------

# Column order of every `SELECT {SUBSCRIPTION_COLUMNS}`; `subscription_from_row` relies on it.
SUBSCRIPTION_COLUMNS = (
    "id, user_id, app, platform, display_name, push_channel, expiration_date_time,"
    " created_date_time, last_modified_date_time, last_delivered, consecutive_failures,"
    " last_error, gone, seen_position"
)
_channel_decoder = msgspec.json.Decoder(PushChannel)


def encode_channel(channel: PushChannel | None) -> str | None:
    """JSON of the tagged union (`{"type": "webPush", ...}`), readable with any SQL tool."""
    return None if channel is None else msgspec.json.encode(channel).decode()


def channel_key(sub: Subscription) -> str | None:
    return None if sub.push_channel is None else sub.push_channel.key


def subscription_values(s: Subscription, to_db: Callable[[datetime], Any]) -> tuple[object, ...]:
    """What a new subscription row holds: id, user_id, app, platform, display_name,
    push_channel, channel_key, expiration_date_time, created_date_time,
    last_modified_date_time (datetimes as `to_db` stores them)."""
    return (
        s.id,
        s.user_id,
        s.app,
        s.platform,
        s.display_name,
        encode_channel(s.push_channel),
        channel_key(s),
        to_db(s.expiration_date_time),
        to_db(s.created_date_time),
        to_db(s.last_modified_date_time),
    )


def subscription_from_row(row: Sequence[Any], to_dt: Callable[[Any], datetime]) -> Subscription:
    return Subscription(
        id=row[0],
        user_id=row[1],
        app=row[2],
        platform=DevicePlatform(row[3]),
        display_name=row[4],
        push_channel=None if row[5] is None else _channel_decoder.decode(row[5]),
        expiration_date_time=to_dt(row[6]),
        created_date_time=to_dt(row[7]),
        last_modified_date_time=to_dt(row[8]),
        delivery=DeliveryState(
            last_delivered_date_time=None if row[9] is None else to_dt(row[9]),
            consecutive_failures=row[10],
            last_error=row[11],
            gone_date_time=None if row[12] is None else to_dt(row[12]),
        ),
        seen_position=row[13],
    )


# Column order `app_from_row` reads: one row per client id, with its app's display name.
APP_SELECT = (
    "SELECT c.client_id, c.host_name, a.display_name, c.secret_hash, c.created_date_time,"
    " c.platform FROM app_clients AS c JOIN apps AS a ON a.host_name = c.host_name"
)
APP_ORDER = " ORDER BY c.host_name, c.created_date_time, c.client_id"


def app_from_row(r: Sequence[Any], to_dt: Callable[[Any], datetime]) -> App:
    return App(
        client_id=r[0],
        host_name=r[1],
        display_name=r[2],
        secret_hash=r[3],
        created_date_time=to_dt(r[4]),
        platform=r[5],
    )


# -- deliveries --------------------------------------------------------------------------------

# A delivery's message is stored as msgspec JSON: exact (datetimes keep their offset) and readable
# with any SQL tool, like the push channel.
_message_decoder = msgspec.json.Decoder(Message)


def encode_message(message: Message) -> str:
    return msgspec.json.encode(message).decode()


def decode_message(data: str | bytes) -> Message:
    return _message_decoder.decode(data)


def decode_channel(data: str) -> PushChannel:
    channel: PushChannel = _channel_decoder.decode(data)
    return channel


# The push channel's JSON tag ("type") of each provider, for SQL that checks a channel's provider.
CHANNEL_TAG: dict[Provider, str] = {
    provider: str(cast(type[msgspec.Struct], cls).__struct_config__.tag)
    for cls, provider in PROVIDER_OF.items()
}


def provider_of(channel: PushChannel | None) -> Provider | None:
    return None if channel is None else PROVIDER_OF[type(channel)]
