"""Query compilation for both dialects: a `Filter`/`Order` of the OData layer turned into SQL text
with bound parameters, and the WHERE clause of one feed's live rows."""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from herald.query import FIELDS, And, Comparison, Filter, In, Not, Or, Order
from herald.store.rows import as_utc, to_micros

# Query fields are stored under their own names; only these may reach SQL text.
COLUMNS: dict[str, str] = {name: name for name in FIELDS}
NULLABLE = frozenset({"group_name"})


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
