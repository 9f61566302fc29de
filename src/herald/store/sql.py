"""What the SQLite and PostgreSQL stores share: the notification row layout, the content column
codec, query compilation and migration loading."""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any

import msgspec

from herald.errors import HeraldError
from herald.model import (
    FallbackPolicy,
    Notification,
    Payload,
    Priority,
    ReadState,
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


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(StoredContent)


def encode_content(n: Notification) -> bytes:
    return _encoder.encode(
        StoredContent(n.payload, n.target_policy, n.fallback_policy, n.display_time_to_live)
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
    )


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_micros(dt: datetime) -> int:
    """Aware datetime -> integer microseconds since the epoch (exact, sortable)."""
    return (dt - _EPOCH) // timedelta(microseconds=1)


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
