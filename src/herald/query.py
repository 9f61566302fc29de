"""A list query over a user's notifications, independent of OData syntax and of SQL.

`api/odata.py` builds these from `$filter`/`$orderby`/`$top`/`$skip`; each store compiles them
to SQL.
Field names are the snake_case `Notification` attributes listed in `FIELDS`; values are already
normalised (enum members, aware UTC datetimes, str, or None for `eq null`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from herald.model import Notification, Priority, ReadState, UserActionState

Op = Literal["eq", "ne", "lt", "le", "gt", "ge"]
Value = str | datetime | ReadState | UserActionState | Priority | None

# Filterable/orderable fields and their value kind.
FIELDS: dict[str, type] = {
    "id": str,
    "app_notification_id": str,
    "group_name": str,
    "read_state": ReadState,
    "user_action_state": UserActionState,
    "priority": Priority,
    "created_date_time": datetime,
    "last_modified_date_time": datetime,
    "expiration_date_time": datetime,
}


@dataclass(frozen=True)
class Comparison:
    field: str
    op: Op
    value: Value


@dataclass(frozen=True)
class In:
    field: str
    values: tuple[Value, ...]


@dataclass(frozen=True)
class And:
    left: Filter
    right: Filter


@dataclass(frozen=True)
class Or:
    left: Filter
    right: Filter


@dataclass(frozen=True)
class Not:
    operand: Filter


Filter = Comparison | In | And | Or | Not


@dataclass(frozen=True)
class Order:
    field: str
    descending: bool = False


# Newest first; `id` breaks ties so paging with skip is stable.
DEFAULT_ORDER: tuple[Order, ...] = (Order("created_date_time", descending=True),)


@dataclass(frozen=True)
class Query:
    filter: Filter | None = None
    order: tuple[Order, ...] = DEFAULT_ORDER
    top: int = 100
    skip: int = 0
    count: bool = False
    select: tuple[str, ...] | None = field(default=None)


@dataclass(frozen=True)
class Page:
    items: list[Notification]
    total: int | None = None
