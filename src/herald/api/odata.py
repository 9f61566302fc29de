"""OData query options of `GET .../notifications` -> `herald.query.Query` (`$filter` itself is
parsed by `filter.py`).

Everything the client gets wrong raises `InvalidRequest` whose `target` is the (lower-cased)
option name and whose message says what is wrong, where, and what is supported. See docs/odata.md
for the supported subset.

Case rules: option names, property names and `$count` values are case-insensitive.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final

from herald.api.filter import (
    MAX_FILTER_DEPTH,
    MAX_FILTER_LENGTH,
    PROPERTIES_TEXT,
    PROPERTY_BY_LOWER,
    WIRE_FIELDS,
    clip,
    parse_filter,
)
from herald.errors import InvalidRequest
from herald.query import DEFAULT_ORDER, Order, Query

__all__ = [
    "MAX_FILTER_DEPTH",
    "MAX_FILTER_LENGTH",
    "MAX_SKIP",
    "SELECTABLE",
    "SUPPORTED_OPTIONS",
    "SYSTEM_OPTIONS",
    "WIRE_FIELDS",
    "option_name",
    "parse_filter",
    "parse_query",
    "parse_select",
]

# Every wire property of a notification.
SELECTABLE: Final[frozenset[str]] = frozenset(
    {
        "id",
        "targetHostName",
        "appNotificationId",
        "groupName",
        "payload",
        "targetPolicy",
        "priority",
        "displayTimeToLive",
        "expirationDateTime",
        "fallbackPolicy",
        "createdDateTime",
        "lastModifiedDateTime",
        "readState",
        "userActionState",
    }
)

SUPPORTED_OPTIONS: Final[tuple[str, ...]] = (
    "$filter",
    "$orderby",
    "$top",
    "$skip",
    "$count",
    "$select",
)
MAX_SKIP: Final = 2_147_483_647  # fits every store's OFFSET type

_UNSUPPORTED_HINTS: Final[Mapping[str, str]] = {
    "$skiptoken": " Follow @odata.nextLink to page; it uses $skip.",
    "$deltatoken": " Use the delta function for change tracking.",
    "$search": " Use $filter.",
}

_SELECTABLE_BY_LOWER: Final[Mapping[str, str]] = {name.lower(): name for name in SELECTABLE}
_SELECTABLE_TEXT: Final = ", ".join(sorted(SELECTABLE))


def _supported_text() -> str:
    return ", ".join(SUPPORTED_OPTIONS)


def parse_query(
    params: Mapping[str, str] | Iterable[tuple[str, str]],
    *,
    default_top: int,
    max_top: int,
) -> Query:
    """Validate the OData options in `params` (`$name`, or a bare Graph option name such as
    `top`); other parameters are ignored.

    Pass Starlette's `request.query_params` (its `multi_items()` is used) or any iterable of
    (name, value) pairs, so that repeated options are detected.
    """
    options = _collect_options(params)
    filter_text = options.get("$filter")
    orderby = options.get("$orderby")
    top = options.get("$top")
    skip = options.get("$skip")
    count = options.get("$count")
    select = options.get("$select")
    return Query(
        filter=None if filter_text is None else parse_filter(filter_text),
        order=DEFAULT_ORDER if orderby is None else _parse_orderby(orderby),
        top=default_top if top is None else _parse_int(top, "$top", max_top),
        skip=0 if skip is None else _parse_int(skip, "$skip", MAX_SKIP),
        count=False if count is None else _parse_count(count),
        select=None if select is None else parse_select(select),
    )


def _pairs(params: Mapping[str, str] | Iterable[tuple[str, str]]) -> Iterable[tuple[str, str]]:
    if isinstance(params, Mapping):
        multi = getattr(params, "multi_items", None)  # Starlette QueryParams keeps repeats here
        items: Iterable[tuple[str, str]] = multi() if callable(multi) else params.items()
        return items
    return params


def options(params: Mapping[str, str] | Iterable[tuple[str, str]]) -> dict[str, str]:
    """The `$` options by lower-cased name, each once; unsupported or repeated ones are a 400."""
    return _collect_options(params)


# OData system query options Graph knows. On /beta the `$` is optional (docs: "Use query
# parameters"), so `top=1` is `$top=1`: the bare names are options too, never ignored.
SYSTEM_OPTIONS: Final[frozenset[str]] = frozenset(
    {
        "$count",
        "$deltatoken",
        "$expand",
        "$filter",
        "$format",
        "$orderby",
        "$search",
        "$select",
        "$skip",
        "$skiptoken",
        "$top",
    }
)


def option_name(key: str) -> str | None:
    """The lower-cased `$name` of the OData option a query parameter is, or None if it is not
    one (a parameter of another kind, which every endpoint ignores, as Graph does)."""
    name = key.lower()
    if name.startswith("$"):
        return name
    name = "$" + name
    return name if name in SYSTEM_OPTIONS else None


def _collect_options(params: Mapping[str, str] | Iterable[tuple[str, str]]) -> dict[str, str]:
    options: dict[str, str] = {}
    for key, value in _pairs(params):
        name = option_name(key)
        if name is None:
            continue
        if name not in SUPPORTED_OPTIONS:
            hint = _UNSUPPORTED_HINTS.get(name, "")
            supported = _supported_text()
            raise InvalidRequest(
                f"Query option '{clip(key)}' is not supported. Supported: {supported}.{hint}",
                target=clip(name),
            )
        if name in options:
            raise InvalidRequest(f"Query option '{name}' is given more than once.", target=name)
        if not value.strip():
            raise InvalidRequest(f"Query option '{name}' must not be empty.", target=name)
        options[name] = value
    return options


def _parse_int(raw: str, name: str, maximum: int) -> int:
    text = raw.strip()
    if not text.isascii() or not text.isdigit():
        raise InvalidRequest(
            f"Query option '{name}' must be a non-negative integer, got '{clip(raw)}'.",
            target=name,
        )
    if len(text) > 18 or int(text) > maximum:
        raise InvalidRequest(
            f"Query option '{name}' must be at most {maximum}, got '{clip(raw)}'.", target=name
        )
    return int(text)


def _parse_count(raw: str) -> bool:
    text = raw.strip().lower()
    if text not in ("true", "false"):
        raise InvalidRequest(
            f"Query option '$count' must be 'true' or 'false', got '{clip(raw)}'.", target="$count"
        )
    return text == "true"


def _split_list(raw: str, name: str) -> list[str]:
    items = [item.strip() for item in raw.split(",")]
    if "" in items:
        raise InvalidRequest(
            f"Query option '{name}' has an empty item; separate items with single commas.",
            target=name,
        )
    return items


def parse_select(raw: str) -> tuple[str, ...] | None:
    """`$select`'s property names (None for `*`: every property)."""
    items = _split_list(raw, "$select")
    if items == ["*"]:
        return None
    selected: list[str] = []
    for item in items:
        wire = _SELECTABLE_BY_LOWER.get(item.lower())
        if wire is None:
            raise InvalidRequest(
                f"Cannot $select unknown property '{clip(item)}'. Selectable: {_SELECTABLE_TEXT}"
                " (or '*' alone for all).",
                target="$select",
            )
        if wire in selected:
            raise InvalidRequest(f"Property '{wire}' is selected more than once.", target="$select")
        selected.append(wire)
    return tuple(selected)


def _parse_orderby(raw: str) -> tuple[Order, ...]:
    order: list[Order] = []
    for item in _split_list(raw, "$orderby"):
        item_order = _parse_order_item(item)
        if any(o.field == item_order.field for o in order):
            raise InvalidRequest(
                f"Property '{item.split()[0]}' appears more than once in $orderby.",
                target="$orderby",
            )
        order.append(item_order)
    return tuple(order)


def _parse_order_item(item: str) -> Order:
    words = item.split()
    wire = PROPERTY_BY_LOWER.get(words[0].lower())
    if wire is None:
        raise InvalidRequest(
            f"Cannot $orderby unknown property '{clip(words[0])}'. Sortable: {PROPERTIES_TEXT}.",
            target="$orderby",
        )
    direction = words[1].lower() if len(words) == 2 else "asc"
    if len(words) > 2 or direction not in ("asc", "desc"):
        raise InvalidRequest(
            f"Invalid $orderby item '{clip(item)}'; expected '<property> [asc|desc]'.",
            target="$orderby",
        )
    return Order(WIRE_FIELDS[wire], descending=direction == "desc")
