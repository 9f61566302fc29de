"""What the SQLite and PostgreSQL stores share: the notification and subscription row layouts,
the content and push channel codecs, query compilation and migration loading."""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any, NamedTuple, cast

import msgspec

from herald.errors import HeraldError, PayloadTooLarge, PreconditionFailed
from herald.model import (
    PROVIDER_OF,
    App,
    Change,
    ChangeKind,
    Content,
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
    Settle,
    Settlement,
    StatePatch,
    Subscription,
    TargetPolicy,
    UserActionState,
)
from herald.query import FIELDS, And, Comparison, Filter, In, Not, Or, Order

# Column order of every `SELECT {NOTIFICATION_COLUMNS}`; `notification_from_row` relies on it.
NOTIFICATION_COLUMNS = (
    "id, user_id, app, app_notification_id, target_host_name, group_name, priority, read_state,"
    " user_action_state, created_date_time, last_modified_date_time, expiration_date_time,"
    " version, content"
)
# Query fields are stored under their own names; only these may reach SQL text.
COLUMNS: dict[str, str] = {name: name for name in FIELDS}
NULLABLE = frozenset({"group_name"})


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


@dataclass(frozen=True)
class Dialect:
    placeholder: Callable[[int], str]  # 1-based parameter index -> placeholder text
    time: Callable[[datetime], object]  # Python datetime -> bound parameter


SQLITE = Dialect(placeholder=lambda _: "?", time=to_micros)
POSTGRES = Dialect(placeholder=lambda i: f"${i}", time=as_utc)


class Compiler:
    """Turns a `Filter`/`Order` into SQL text, appending bound values to `params`."""

    def __init__(self, dialect: Dialect, params: list[object]) -> None:
        self.dialect = dialect
        self.params = params

    def bind(self, value: object) -> str:
        if isinstance(value, datetime):
            value = self.dialect.time(value)
        elif isinstance(value, enum.Enum):
            value = value.value
        self.params.append(value)
        return self.dialect.placeholder(len(self.params))

    def where(self, f: Filter) -> str:
        """Every compiled predicate is TRUE or FALSE, never NULL, so `Not` follows OData logic."""
        match f:
            case And(left, right):
                return f"({self.where(left)} AND {self.where(right)})"
            case Or(left, right):
                return f"({self.where(left)} OR {self.where(right)})"
            case Not(operand):
                return f"(NOT {self.where(operand)})"
            case Comparison(field, op, value):
                return self._comparison(column(field), op, value)
            case In(field, values):
                return self._in(column(field), values)
        raise TypeError(f"not a filter: {f!r}")

    def _comparison(self, col: str, op: str, value: object) -> str:
        if value is None:
            if op == "eq":
                return f"({col} IS NULL)"
            return f"({col} IS NOT NULL)" if op == "ne" else "(1 = 0)"
        sql = f"{col} {_OPS[op]} {self.bind(value)}"
        if col not in NULLABLE:
            return f"({sql})"
        if op == "ne":
            return f"({col} IS NULL OR {sql})"
        return f"({col} IS NOT NULL AND {sql})"

    def _in(self, col: str, values: tuple[object, ...]) -> str:
        present = [v for v in values if v is not None]
        parts = []
        if present:
            listed = ", ".join(self.bind(v) for v in present)
            parts.append(f"({col} IS NOT NULL AND {col} IN ({listed}))")
        if len(present) != len(values):
            parts.append(f"({col} IS NULL)")
        return f"({' OR '.join(parts)})" if parts else "(1 = 0)"


_OPS = {"eq": "=", "ne": "<>", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}


def column(field: str) -> str:
    try:
        return COLUMNS[field]
    except KeyError:
        raise ValueError(f"not a queryable field: {field!r}") from None


def order_by(order: Sequence[Order]) -> str:
    """ORDER BY text; NULLs sort as the smallest value in both dialects; `id` breaks ties."""
    terms = [
        f"{column(o.field)} DESC NULLS LAST" if o.descending else f"{column(o.field)} NULLS FIRST"
        for o in order
    ]
    if not any(o.field == "id" for o in order):
        terms.append("id")
    return ", ".join(terms)


# -- commit signal ---------------------------------------------------------------------------

log = logging.getLogger("herald.store")


class CommitHooks:
    """The `on_commit` callbacks of a store, called on the event loop after a commit that added
    outbox entries."""

    def __init__(self) -> None:
        self._callbacks: list[Callable[[], None]] = []

    def add(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)

    def fire(self) -> None:
        # A failing callback must not fail the writer (its batch has committed) nor the others.
        for callback in self._callbacks:
            try:
                callback()
            except Exception:
                log.exception("on_commit callback failed")


# -- migrations ------------------------------------------------------------------------------


class SchemaTooNew(HeraldError):
    """The database was migrated by a newer Herald; opening it could corrupt it."""


def migrations(dialect: str) -> list[tuple[int, str]]:
    """(version, sql) of every packaged migration for `dialect`, ascending."""
    folder = resources.files("herald.store").joinpath("migrations", dialect)
    found = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            found.append((int(entry.name.split("_", 1)[0]), entry.read_text("utf-8")))
    return sorted(found)


def check_version(current: int, known: int) -> None:
    if current > known:
        raise SchemaTooNew(
            f"database schema version {current} is newer than this Herald knows ({known});"
            " upgrade Herald or use another database"
        )


def feed_where(
    dialect: Dialect, user_id: str, app: str, filter: Filter | None, now: datetime
) -> tuple[str, list[object]]:
    """WHERE text and parameters for one (user, app) feed's live rows, plus an optional filter."""
    params: list[object] = [user_id, app, dialect.time(now)]
    p = dialect.placeholder
    where = f"user_id = {p(1)} AND app = {p(2)} AND expiration_date_time > {p(3)}"
    if filter is not None:
        where += " AND " + Compiler(dialect, params).where(filter)
    return where, params


def check_etag(n: Notification, if_match: int | None) -> None:
    if if_match is not None and if_match != n.version:
        raise PreconditionFailed(f"notification {n.id} is at version {n.version}, not {if_match}")


def new_notification(
    user_id: str, app: str, content: Content, new_id: str, now: datetime, old: Notification | None
) -> Notification:
    """The stored form of `content`: new, or replacing `old` (id and creation time kept)."""
    return Notification(
        id=new_id if old is None else old.id,
        user_id=user_id,
        app=app,
        app_notification_id=content.app_notification_id or new_id,
        target_host_name=content.target_host_name,
        group_name=content.group_name,
        payload=content.payload,
        target_policy=content.target_policy,
        priority=content.priority,
        display_time_to_live=content.display_time_to_live,
        expiration_date_time=content.expiration_date_time.astimezone(UTC),
        fallback_policy=content.fallback_policy,
        created_date_time=now if old is None else old.created_date_time,
        last_modified_date_time=now,
        version=1 if old is None else old.version + 1,
        extra=content.extra,
    )


def patched(old: Notification, patch: StatePatch, now: datetime) -> Notification:
    """`old` with the non-None fields of `patch` applied, as a new version written at `now`.

    Open-type properties merge: each one in `patch.extra` is set, or removed when null. The
    merged set must fit `patch.max_extra_bytes` (checked here, inside the write: two patches
    that each fit can add up); `PayloadTooLarge` otherwise, before anything is written."""
    changes = {k: v for k, v in msgspec.structs.asdict(patch).items() if v is not None}
    del changes["max_extra_bytes"]
    if "expiration_date_time" in changes:
        changes["expiration_date_time"] = changes["expiration_date_time"].astimezone(UTC)
    if patch.extra is not None:
        changes["extra"] = merged = merge_extra(old.extra, patch.extra)
        size = len(merged or b"")
        if patch.max_extra_bytes and size > patch.max_extra_bytes:
            raise PayloadTooLarge(
                f"The open properties would take {size} bytes encoded; the limit is "
                f"{patch.max_extra_bytes} bytes."
            )
    return msgspec.structs.replace(
        old, **changes, version=old.version + 1, last_modified_date_time=now.astimezone(UTC)
    )


def merge_extra(old: bytes | None, update: bytes) -> bytes | None:
    merged: dict[str, Any] = msgspec.json.decode(old) if old else {}
    for name, value in msgspec.json.decode(update, type=dict[str, Any]).items():
        merged.pop(name, None)  # re-inserted last: the newest property is echoed last
        if value is not None:
            merged[name] = value
    return msgspec.json.encode(merged) if merged else None


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
    """An outbox row (seq, user id, *change row as `change_from_row` reads it)."""
    return Pending(r[0], change_from_row(r[1], r[2:], to_dt))


# -- subscriptions -----------------------------------------------------------------------------

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


def stored_subscription(
    sub: Subscription, kept: Subscription | None = None, reset: bool = True
) -> Subscription:
    """`sub` as a read returns it (datetimes in UTC); `kept`: the row it updates in place, whose
    id, creation time and seen position it keeps, and its delivery state unless `reset`. A new
    row starts with a fresh delivery state and seen position 0."""
    return msgspec.structs.replace(
        sub,
        id=sub.id if kept is None else kept.id,
        created_date_time=(sub if kept is None else kept).created_date_time.astimezone(UTC),
        expiration_date_time=sub.expiration_date_time.astimezone(UTC),
        last_modified_date_time=sub.last_modified_date_time.astimezone(UTC),
        delivery=DeliveryState() if kept is None or reset else kept.delivery,
        seen_position=0 if kept is None else kept.seen_position,
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


# What `delete_app` removes, in this order (outbox entries and deliveries before the changes and
# subscriptions they refer to; client ids last: idempotency scopes are found through them). Each
# statement takes the host name as its only parameter, `{p}` its placeholder.
DELETE_APP = (
    (
        "outbox",
        "DELETE FROM outbox WHERE EXISTS (SELECT 1 FROM changes AS c WHERE c.app = {p}"
        " AND c.user_id = outbox.user_id AND c.position = outbox.position)",
    ),
    ("deliveries", "DELETE FROM deliveries WHERE app = {p}"),
    ("changes", "DELETE FROM changes WHERE app = {p}"),
    ("notifications", "DELETE FROM notifications WHERE app = {p}"),
    ("subscriptions", "DELETE FROM subscriptions WHERE app = {p}"),
    ("pushCredentials", "DELETE FROM push_credentials WHERE app = {p}"),
    (
        "idempotencyKeys",
        "DELETE FROM idempotency WHERE EXISTS (SELECT 1 FROM app_clients AS a"
        " WHERE a.host_name = {p}"
        " AND substr(idempotency.scope, 1, length(a.client_id) + 1) = a.client_id || ':')",
    ),
    ("clientIds", "DELETE FROM app_clients WHERE host_name = {p}"),
    ("apps", "DELETE FROM apps WHERE host_name = {p}"),
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


# A settlement's `error` as stored: printable text (PostgreSQL rejects NUL in text, and a log
# line or admin page must not carry control characters), at most this long.
MAX_ERROR = 300
_INT64 = range(-(2**63), 2**63)


def clean_error(error: object) -> str | None:
    """`error` made safe to store: whitespace controls become spaces, other unprintable
    characters (NUL, controls, lone surrogates) are dropped, and it is cut to MAX_ERROR."""
    if error is None:
        return None
    text = error if isinstance(error, str) else str(error)
    if not text.isprintable():
        text = "".join(ch if ch.isprintable() else " " if ch in "\t\n\r\v\f" else "" for ch in text)
    return text[:MAX_ERROR]


def settle_ids(outcomes: Sequence[Settlement]) -> list[int]:
    """The delivery ids the outcomes name, sorted, without any no row can have (not a 64-bit
    integer): binding one would fail the whole settle."""
    return sorted({o.id for o in outcomes if type(o.id) is int and o.id in _INT64})


class Claimed(NamedTuple):
    """A delivery a settle names, as it is now: its subscription, the claims made so far, and
    the subscription's current channel key (None: the subscription is gone or has no channel)."""

    subscription_id: str
    attempts: int
    channel_key: str | None


@dataclass(frozen=True, slots=True)
class SubscriptionOutcome:
    """What a settle does to one subscription's DeliveryState, as one update:

    consecutive_failures = (0 if delivered else consecutive_failures) + failures;
    last_error = error if failures else (None if delivered else last_error);
    last_delivered = now if delivered; gone = now if gone.

    Only while the subscription's channel key is still `key`."""

    id: str
    key: str
    delivered: bool
    failures: int
    error: str | None
    gone: bool


@dataclass(slots=True)
class SettlePlan:
    """The writes of one `settle`, in outcome order folded into set-wise statements."""

    delete: list[int] = field(default_factory=list)  # delivery ids
    retry: dict[int, datetime] = field(default_factory=dict)  # delivery id -> new due
    gone: list[str] = field(default_factory=list)  # subscriptions losing every delivery
    subscriptions: list[SubscriptionOutcome] = field(default_factory=list)  # sorted by id


def settle_plan(outcomes: Sequence[Settlement], found: dict[int, Claimed]) -> SettlePlan:
    """Apply `outcomes` in order to the deliveries `found` (by id).

    An outcome applies only to the claim it answers: it is ignored if its delivery is not
    there (unknown, or removed by an earlier outcome) or has been claimed again since (other
    `attempts`). It changes the subscription's delivery state only if it was for the channel
    the subscription has now; a GONE for an old channel removes its own delivery only."""
    alive = {id: c.subscription_id for id, c in found.items()}
    plan = SettlePlan()
    # Per subscription: [delivered, failures since the last delivery, last error, gone, key].
    state: dict[str, list[Any]] = {}
    for o in outcomes:
        sub = alive.get(o.id)
        if sub is None:
            continue
        claim = found[o.id]
        if claim.attempts != o.attempts:
            continue
        s = None
        if claim.channel_key is not None and claim.channel_key == o.channel_key:
            s = state.setdefault(sub, [False, 0, None, False, claim.channel_key])
        if o.settle is Settle.RETRY:
            if o.due is not None:
                plan.retry[o.id] = o.due if o.due.tzinfo is not None else o.due.replace(tzinfo=UTC)
            if s is not None:
                s[1] += 1
                s[2] = o.error
            continue
        del alive[o.id]
        plan.retry.pop(o.id, None)
        plan.delete.append(o.id)
        if s is None:
            continue
        if o.settle is Settle.DONE:
            if o.sent:
                s[0], s[1], s[2] = True, 0, None
            continue
        s[1] += 1
        s[2] = o.error
        if o.settle is Settle.GONE and not s[3]:
            s[3] = True
            plan.gone.append(sub)
            for other in [i for i, owner in alive.items() if owner == sub]:
                del alive[other]
                plan.retry.pop(other, None)
    plan.subscriptions = [
        SubscriptionOutcome(sub, s[4], s[0], s[1], clean_error(s[2]) if s[1] else None, s[3])
        for sub, s in sorted(state.items())
        if s[0] or s[1] or s[3]
    ]
    return plan
