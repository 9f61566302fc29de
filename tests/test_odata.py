"""Tests for herald.odata: OData query options -> herald.query.Query."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime

import pytest

from herald.api.odata import (
    MAX_FILTER_DEPTH,
    MAX_FILTER_LENGTH,
    SELECTABLE,
    WIRE_FIELDS,
    parse_filter,
    parse_query,
)
from herald.errors import InvalidRequest
from herald.model import Priority, ReadState, UserActionState
from herald.query import (
    DEFAULT_ORDER,
    FIELDS,
    And,
    Comparison,
    Filter,
    In,
    Not,
    Or,
    Order,
    Query,
)

T0 = datetime(2026, 11, 27, 10, 0, tzinfo=UTC)


def q(params: Mapping[str, str] | Iterable[tuple[str, str]]) -> Query:
    return parse_query(params, default_top=100, max_top=1000)


def eq(field: str, value: object) -> Comparison:
    return Comparison(field, "eq", value)  # type: ignore[arg-type]


RS_UNREAD = eq("read_state", ReadState.UNREAD)
RS_READ = eq("read_state", ReadState.READ)
GROUP_A = eq("group_name", "a")

# --------------------------------------------------------------------------------------------------
# $filter: valid

VALID_FILTERS: list[tuple[str, Filter]] = [
    # every property, every comparison operator
    ("id eq 'n1'", eq("id", "n1")),
    ("appNotificationId eq 'x'", eq("app_notification_id", "x")),
    ("groupName eq 'a'", GROUP_A),
    ("readState eq 'unread'", RS_UNREAD),
    ("userActionState eq 'dismissed'", eq("user_action_state", UserActionState.DISMISSED)),
    ("priority eq 'High'", eq("priority", Priority.HIGH)),
    ("createdDateTime eq 2026-11-27T10:00:00Z", eq("created_date_time", T0)),
    (
        "lastModifiedDateTime lt 2026-11-27T10:00:00Z",
        Comparison("last_modified_date_time", "lt", T0),
    ),
    ("expirationDateTime ge 2026-11-27T10:00:00Z", Comparison("expiration_date_time", "ge", T0)),
    ("id ne 'n1'", Comparison("id", "ne", "n1")),
    ("groupName lt 'm'", Comparison("group_name", "lt", "m")),
    ("groupName le 'm'", Comparison("group_name", "le", "m")),
    ("id gt 'm'", Comparison("id", "gt", "m")),
    ("id ge 'm'", Comparison("id", "ge", "m")),
    ("readState ne 'read'", Comparison("read_state", "ne", ReadState.READ)),
    # enum values: case-insensitive, typed literals
    ("readState eq 'Unread'", RS_UNREAD),
    ("readState eq 'READ'", RS_READ),
    ("priority eq 'high'", eq("priority", Priority.HIGH)),
    ("priority eq 'none'", eq("priority", Priority.NONE)),
    ("priority eq 'Low'", eq("priority", Priority.LOW)),
    ("userActionState eq 'Snoozed'", eq("user_action_state", UserActionState.SNOOZED)),
    ("readState eq microsoft.graph.readState'read'", RS_READ),
    ("readState eq Microsoft.Graph.ReadState'READ'", RS_READ),
    ("priority eq microsoft.graph.priority'High'", eq("priority", Priority.HIGH)),
    (
        "userActionState eq microsoft.graph.userActionState'activated'",
        eq("user_action_state", UserActionState.ACTIVATED),
    ),
    # strings: quote escaping, spaces, unicode, empty, keywords inside
    ("groupName eq 'it''s'", eq("group_name", "it's")),
    ("groupName eq ''''", eq("group_name", "'")),
    ("groupName eq ''", eq("group_name", "")),
    ("groupName eq 'a and b or not c'", eq("group_name", "a and b or not c")),
    ("groupName eq 'héllo 日本'", eq("group_name", "héllo 日本")),
    ("groupName eq 'null'", eq("group_name", "null")),
    ("groupName eq '2026-11-27T10:00:00Z'", eq("group_name", "2026-11-27T10:00:00Z")),
    # null
    ("groupName eq null", eq("group_name", None)),
    ("groupName ne null", Comparison("group_name", "ne", None)),
    ("groupName eq NULL", eq("group_name", None)),
    ("expirationDateTime eq null", eq("expiration_date_time", None)),
    # dates: fractions, offsets, quoted, lower-case t/z, no seconds
    (
        "createdDateTime gt 2026-11-27T10:00:00.123Z",
        Comparison("created_date_time", "gt", T0.replace(microsecond=123000)),
    ),
    (
        "createdDateTime gt 2026-11-27T10:00:00.1234567Z",
        Comparison("created_date_time", "gt", T0.replace(microsecond=123456)),
    ),
    ("createdDateTime gt 2026-11-27T12:00:00+02:00", Comparison("created_date_time", "gt", T0)),
    ("createdDateTime gt 2026-11-27T05:30:00-04:30", Comparison("created_date_time", "gt", T0)),
    (
        "createdDateTime gt 2026-11-27T12:00:00.5+02:00",
        Comparison("created_date_time", "gt", T0.replace(microsecond=500000)),
    ),
    ("createdDateTime gt '2026-11-27T10:00:00Z'", Comparison("created_date_time", "gt", T0)),
    ("createdDateTime gt 2026-11-27t10:00:00z", Comparison("created_date_time", "gt", T0)),
    ("createdDateTime gt 2026-11-27T10:00Z", Comparison("created_date_time", "gt", T0)),
    (
        "createdDateTime lt 2026-11-28T01:00:00+02:00",
        Comparison("created_date_time", "lt", datetime(2026, 11, 27, 23, 0, tzinfo=UTC)),
    ),
    # in
    ("id in ('a')", In("id", ("a",))),
    ("id in ('a','b', 'c')", In("id", ("a", "b", "c"))),
    ("readState in ('read', 'UNREAD')", In("read_state", (ReadState.READ, ReadState.UNREAD))),
    (
        "priority in (microsoft.graph.priority'High', 'low')",
        In("priority", (Priority.HIGH, Priority.LOW)),
    ),
    ("createdDateTime in (2026-11-27T10:00:00Z)", In("created_date_time", (T0,))),
    ("id IN ('a')", In("id", ("a",))),
    # and / or / not, precedence not > and > or, left associativity
    ("groupName eq 'a' and readState eq 'unread'", And(GROUP_A, RS_UNREAD)),
    ("groupName eq 'a' or readState eq 'unread'", Or(GROUP_A, RS_UNREAD)),
    (
        "groupName eq 'a' or readState eq 'unread' and readState eq 'read'",
        Or(GROUP_A, And(RS_UNREAD, RS_READ)),
    ),
    (
        "groupName eq 'a' and readState eq 'unread' or readState eq 'read'",
        Or(And(GROUP_A, RS_UNREAD), RS_READ),
    ),
    (
        "(groupName eq 'a' or readState eq 'unread') and readState eq 'read'",
        And(Or(GROUP_A, RS_UNREAD), RS_READ),
    ),
    (
        "groupName eq 'a' and readState eq 'unread' and readState eq 'read'",
        And(And(GROUP_A, RS_UNREAD), RS_READ),
    ),
    (
        "groupName eq 'a' or readState eq 'unread' or readState eq 'read'",
        Or(Or(GROUP_A, RS_UNREAD), RS_READ),
    ),
    ("not readState eq 'read'", Not(RS_READ)),
    ("not(readState eq 'read')", Not(RS_READ)),
    ("not not readState eq 'read'", Not(Not(RS_READ))),
    ("not readState eq 'read' and groupName eq 'a'", And(Not(RS_READ), GROUP_A)),
    (
        "not (readState eq 'read' or groupName eq 'a')",
        Not(Or(RS_READ, GROUP_A)),
    ),
    ("((readState eq 'read'))", RS_READ),
    ("NOT readState EQ 'read' AND groupName Eq 'a'", And(Not(RS_READ), GROUP_A)),
    # property names are case-insensitive, whitespace is flexible
    ("READSTATE eq 'read'", RS_READ),
    ("groupname eq 'a'", GROUP_A),
    ("  readState   eq\t'read'  ", RS_READ),
    ("(readState eq 'read')and(groupName eq 'a')", And(RS_READ, GROUP_A)),
    ("id in('a','b')", In("id", ("a", "b"))),
]


@pytest.mark.parametrize(("text", "expected"), VALID_FILTERS, ids=[t for t, _ in VALID_FILTERS])
def test_valid_filter(text: str, expected: Filter) -> None:
    assert parse_filter(text) == expected


def test_filter_values_have_exact_types() -> None:
    result = parse_filter("readState eq 'read'")
    assert isinstance(result, Comparison)
    assert type(result.value) is ReadState
    dated = parse_filter("createdDateTime gt 2026-11-27T12:00:00+02:00")
    assert isinstance(dated, Comparison)
    assert isinstance(dated.value, datetime)
    assert dated.value.tzinfo is UTC


def test_filter_at_limits_is_accepted() -> None:
    nested = "(" * MAX_FILTER_DEPTH + "id eq 'a'" + ")" * MAX_FILTER_DEPTH
    assert parse_filter(nested) == eq("id", "a")
    long_string = "id eq '" + "x" * (MAX_FILTER_LENGTH - 8) + "'"
    assert len(long_string) == MAX_FILTER_LENGTH
    assert parse_filter(long_string) == eq("id", "x" * (MAX_FILTER_LENGTH - 8))


# --------------------------------------------------------------------------------------------------
# $filter: invalid (text, fragments the message must contain)

INVALID_FILTERS: list[tuple[str, tuple[str, ...]]] = [
    ("", ("empty",)),
    ("   ", ("empty",)),
    ("x" * 100 + " eq 'a'", ("unknown property '" + "x" * 40 + "...'",)),
    ("foo eq 'a'", ("unknown property 'foo'", "position 1", "readState")),
    ("payload eq 'a'", ("unknown property 'payload'",)),
    ("readState eq 5", ("enum property 'readState'", "'5'", "'unread', 'read'")),
    ("readState eq 'maybe'", ("'maybe' is not a valid value for 'readState'", "'unread'")),
    ("priority eq 'urgent'", ("'urgent'", "'None', 'High', 'Low'")),
    ("readState lt 'read'", ("operator 'lt' is not supported on enum property 'readState'",)),
    ("priority ge 'High'", ("operator 'ge'", "enum")),
    ("readState eq microsoft.graph.priority'High'", ("does not match", "readState")),
    ("createdDateTime eq 'abc'", ("'abc' is not a valid DateTimeOffset", "createdDateTime")),
    ("createdDateTime eq 5", ("'5' is not a valid DateTimeOffset",)),
    ("createdDateTime eq 2026-11-27", ("not a valid DateTimeOffset",)),
    ("createdDateTime eq 2026-11-27T10:00:00", ("time zone is required", "%2B")),
    ("createdDateTime eq 2026-11-27T10:00:00 02:00", ("time zone is required",)),
    ("createdDateTime eq 2026-13-27T10:00:00Z", ("month must be in 1..12",)),
    ("createdDateTime eq 2026-02-30T10:00:00Z", ("day is out of range",)),
    ("createdDateTime eq 2026-11-27T25:00:00Z", ("hour must be in 0..23",)),
    ("createdDateTime eq 2026-11-27T10:00:00+24:00", ("offset must be between",)),
    ("createdDateTime eq 2026-11-27T10:00:00-02:75", ("got -02:75",)),
    ("createdDateTime eq 0001-01-01T00:00:00+01:00", ("not a valid DateTimeOffset",)),
    ("createdDateTime eq ٢٠٢٦-11-27T10:00:00Z", ("unexpected character",)),
    ("createdDateTime eq 'a' 'b'", ("not a valid DateTimeOffset",)),
    ("createdDateTime eq microsoft.graph.priority'High'", ("expected a DateTimeOffset",)),
    ("createdDateTime lt null", ("null can only be compared with eq or ne",)),
    ("groupName eq abc", ("expected a string literal for 'groupName'", "single quotes")),
    ("groupName eq 5", ("expected a string literal",)),
    ("groupName eq true", ("expected a string literal", "'true'")),
    ("groupName eq microsoft.graph.readState'read'", ("expected a string literal",)),
    ("groupName eq 'a", ("unterminated string literal", "position 14")),
    ("groupName eq 'it's'", ("unterminated string",)),
    ("groupName eq 'a' extra", ("unexpected 'extra'", "position 18")),
    ("groupName eq 'a' 'b'", ("unexpected 'b'",)),
    ("groupName eq 'a')", ("unexpected ')'",)),
    ("(groupName eq 'a'", ("expected ')'", "end of filter")),
    ("((groupName eq 'a')", ("expected ')'",)),
    ("()", ("expected a property name but found ')'",)),
    ("groupName eq 'a' and", ("expected a property name but found end of filter",)),
    ("groupName eq 'a' or or groupName eq 'b'", ("expected a property name", "'or'")),
    ("and groupName eq 'a'", ("expected a property name but found 'and'", "position 1")),
    ("null eq 'a'", ("expected a property name but found 'null'",)),
    ("not", ("expected a property name",)),
    ("groupName", ("expected an operator", "end of filter")),
    ("groupName 'a'", ("expected an operator", "'a'")),
    ("groupName has 'a'", ("expected an operator", "'has'")),
    ("groupName == 'a'", ("unexpected character '='", "position 11")),
    ("groupName eq", ("expected a string literal", "end of filter")),
    ("'a' eq groupName", ("expected a property name but found 'a'",)),
    ("groupName eq groupName", ("expected a string literal", "'groupName'")),
    ("startswith(groupName, 'a')", ("function 'startswith' is not supported",)),
    ("contains(groupName,'a')", ("function 'contains'",)),
    ("groupName/foo eq 'a'", ("unexpected character '/'",)),
    ("groupName eq 'a' && id eq 'b'", ("unexpected character '&'",)),
    ("groupName eq @p1", ("unexpected character '@'",)),
    ("id in ()", ("needs at least one value",)),
    ("id in 'a'", ("expected '(' after 'id in'",)),
    ("id in ('a' 'b')", ("expected ',' or ')'",)),
    ("id in ('a',)", ("expected a string literal", "')'")),
    ("id in ('a'", ("expected ',' or ')'", "end of filter")),
    ("id in ('a', null)", ("null is not allowed in an 'in' list",)),
    ("readState in ('read', 'bogus')", ("'bogus' is not a valid value",)),
    ("groupName eq 'a\x00'", ("NUL",)),
    ("(" * (MAX_FILTER_DEPTH + 1) + "id eq 'a'" + ")" * (MAX_FILTER_DEPTH + 1), ("nested",)),
    ("not " * (MAX_FILTER_DEPTH + 1) + "id eq 'a'", ("nested deeper than 32",)),
    ("id eq '" + "x" * MAX_FILTER_LENGTH + "'", ("maximum is 2000",)),
]


@pytest.mark.parametrize(
    ("text", "fragments"), INVALID_FILTERS, ids=[repr(t[:40]) for t, _ in INVALID_FILTERS]
)
def test_invalid_filter(text: str, fragments: tuple[str, ...]) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_filter(text)
    assert info.value.target == "$filter"
    assert info.value.status == 400
    assert info.value.message.startswith("Invalid $filter")
    for fragment in fragments:
        assert fragment in info.value.message


def test_invalid_filter_through_parse_query() -> None:
    with pytest.raises(InvalidRequest) as info:
        q({"$filter": "bogus eq 1"})
    assert info.value.target == "$filter"
    assert "unknown property 'bogus'" in info.value.message


# --------------------------------------------------------------------------------------------------
# parse_query: valid


def test_defaults() -> None:
    assert q({}) == Query(filter=None, order=DEFAULT_ORDER, top=100, skip=0, count=False)
    assert parse_query([], default_top=7, max_top=10).top == 7


def test_all_options_together() -> None:
    result = q(
        [
            ("$filter", "readState eq 'unread'"),
            ("$orderby", "createdDateTime desc,id"),
            ("$top", "25"),
            ("$skip", "50"),
            ("$count", "true"),
            ("$select", "id,readState"),
        ]
    )
    assert result == Query(
        filter=RS_UNREAD,
        order=(Order("created_date_time", descending=True), Order("id")),
        top=25,
        skip=50,
        count=True,
        select=("id", "readState"),
    )


VALID_OPTIONS: list[tuple[dict[str, str], dict[str, object]]] = [
    ({"$top": "0"}, {"top": 0}),
    ({"$top": "1000"}, {"top": 1000}),
    ({"$top": "007"}, {"top": 7}),
    ({"$TOP": "5"}, {"top": 5}),
    ({"$Top": " 5 "}, {"top": 5}),
    ({"$skip": "0"}, {"skip": 0}),
    ({"$skip": "2147483647"}, {"skip": 2147483647}),
    ({"$count": "true"}, {"count": True}),
    ({"$count": "TRUE"}, {"count": True}),
    ({"$count": "False"}, {"count": False}),
    ({"$orderby": "id"}, {"order": (Order("id"),)}),
    ({"$orderby": "id asc"}, {"order": (Order("id"),)}),
    ({"$orderby": "priority DESC"}, {"order": (Order("priority", descending=True),)}),
    (
        {"$orderby": " groupName desc , readState ,expirationDateTime asc"},
        {
            "order": (
                Order("group_name", descending=True),
                Order("read_state"),
                Order("expiration_date_time"),
            )
        },
    ),
    (
        {"$OrderBy": "lastmodifieddatetime desc"},
        {"order": (Order("last_modified_date_time", True),)},
    ),
    ({"$select": "id"}, {"select": ("id",)}),
    ({"$select": "payload, ID ,targetPolicy"}, {"select": ("payload", "id", "targetPolicy")}),
    ({"$select": "*"}, {"select": None}),
    ({"$select": ",".join(sorted(SELECTABLE))}, {"select": tuple(sorted(SELECTABLE))}),
    # parameters that are not OData options are not ours
    ({"api-version": "x", "foo": "???", "access_token": "t"}, {}),
    # on /beta the `$` is optional: Graph's bare option names are the options
    ({"top": "3", "skip": "2", "Count": "true"}, {"top": 3, "skip": 2, "count": True}),
    ({"select": "id", "orderby": "id"}, {"select": ("id",), "order": (Order("id"),)}),
]


@pytest.mark.parametrize(
    ("params", "changes"), VALID_OPTIONS, ids=[str(p) for p, _ in VALID_OPTIONS]
)
def test_valid_options(params: dict[str, str], changes: dict[str, object]) -> None:
    expected: dict[str, object] = {"filter": None, "order": DEFAULT_ORDER, "top": 100}
    expected |= {"skip": 0, "count": False}
    expected |= {"select": None} | changes
    assert q(params) == Query(**expected)  # type: ignore[arg-type]


def test_accepts_starlette_query_params() -> None:
    from starlette.datastructures import QueryParams

    assert q(QueryParams("$top=3&$filter=id%20eq%20%27a%27")) == Query(filter=eq("id", "a"), top=3)
    with pytest.raises(InvalidRequest, match="more than once") as info:
        q(QueryParams("$top=3&$top=4"))
    assert info.value.target == "$top"
    with pytest.raises(InvalidRequest, match="time zone is required"):
        q(QueryParams("$filter=createdDateTime gt 2026-11-27T10:00:00+02:00"))  # '+' -> ' '
    encoded = QueryParams("$filter=createdDateTime gt 2026-11-27T12:00:00%2B02:00")
    assert q(encoded).filter == Comparison("created_date_time", "gt", T0)


def test_wire_fields_cover_query_fields() -> None:
    assert set(WIRE_FIELDS.values()) == set(FIELDS)
    assert set(WIRE_FIELDS) <= SELECTABLE
    assert len(SELECTABLE) == 14


# --------------------------------------------------------------------------------------------------
# parse_query: invalid (params, target, fragments)

INVALID_OPTIONS: list[tuple[list[tuple[str, str]], str, tuple[str, ...]]] = [
    ([("$expand", "x")], "$expand", ("'$expand' is not supported", "Supported: $filter, $orderby")),
    ([("$EXPAND", "x")], "$expand", ("'$EXPAND' is not supported",)),
    ([("$search", "x")], "$search", ("not supported", "Use $filter")),
    ([("$format", "json")], "$format", ("not supported",)),
    ([("$apply", "x")], "$apply", ("not supported",)),
    ([("$compute", "x")], "$compute", ("not supported",)),
    ([("$levels", "2")], "$levels", ("not supported",)),
    ([("$skiptoken", "abc")], "$skiptoken", ("not supported", "@odata.nextLink")),
    ([("$deltatoken", "abc")], "$deltatoken", ("not supported", "delta")),
    ([("$bogus", "1")], "$bogus", ("'$bogus' is not supported",)),
    ([("$", "1")], "$", ("not supported",)),
    ([("$top", "1"), ("$top", "1")], "$top", ("'$top' is given more than once",)),
    ([("$top", "1"), ("$TOP", "2")], "$top", ("more than once",)),
    ([("$filter", "id eq 'a'"), ("$Filter", "id eq 'b'")], "$filter", ("more than once",)),
    ([("$top", "")], "$top", ("must not be empty",)),
    ([("$filter", "")], "$filter", ("must not be empty",)),
    ([("$top", "-1")], "$top", ("non-negative integer", "'-1'")),
    ([("$top", "abc")], "$top", ("non-negative integer",)),
    ([("$top", "1.5")], "$top", ("non-negative integer",)),
    ([("$top", "1e3")], "$top", ("non-negative integer",)),
    ([("$top", "²")], "$top", ("non-negative integer",)),
    ([("$top", "1001")], "$top", ("at most 1000",)),
    ([("$top", "9" * 5000)], "$top", ("at most 1000", "9999...")),
    ([("$skip", "-5")], "$skip", ("non-negative integer",)),
    ([("$skip", "x")], "$skip", ("non-negative integer",)),
    ([("$skip", "2147483648")], "$skip", ("at most 2147483647",)),
    ([("$count", "yes")], "$count", ("'true' or 'false'", "'yes'")),
    ([("$count", "1")], "$count", ("'true' or 'false'",)),
    ([("$orderby", "foo")], "$orderby", ("unknown property 'foo'", "createdDateTime")),
    ([("$orderby", "payload")], "$orderby", ("unknown property 'payload'",)),
    ([("$orderby", "id sideways")], "$orderby", ("'<property> [asc|desc]'", "'id sideways'")),
    ([("$orderby", "id asc desc")], "$orderby", ("'<property> [asc|desc]'",)),
    ([("$orderby", "id,id desc")], "$orderby", ("'id' appears more than once",)),
    ([("$orderby", "ID,id")], "$orderby", ("more than once",)),
    ([("$orderby", "id,")], "$orderby", ("empty item",)),
    ([("$orderby", "id,,readState")], "$orderby", ("empty item",)),
    ([("$select", "foo")], "$select", ("unknown property 'foo'", "targetHostName")),
    ([("$select", "id,userId")], "$select", ("unknown property 'userId'",)),
    ([("$select", "id,,payload")], "$select", ("empty item",)),
    ([("$select", "id,ID")], "$select", ("'id' is selected more than once",)),
    ([("$select", "*,id")], "$select", ("unknown property '*'",)),
    ([("$select", "payload/rawContent")], "$select", ("unknown property",)),
    # bare option names are options too: checked, never ignored
    ([("top", "nonsense")], "$top", ("non-negative integer",)),
    ([("filter", "???")], "$filter", ()),
    ([("expand", "x")], "$expand", ("not supported",)),
    ([("top", "1"), ("$top", "2")], "$top", ("more than once",)),
]


@pytest.mark.parametrize(
    ("params", "target", "fragments"),
    INVALID_OPTIONS,
    ids=[f"{p[0][0]}={p[0][1][:20]}" for p, _, _ in INVALID_OPTIONS],
)
def test_invalid_options(
    params: list[tuple[str, str]], target: str, fragments: tuple[str, ...]
) -> None:
    with pytest.raises(InvalidRequest) as info:
        q(params)
    assert info.value.target == target
    for fragment in fragments:
        assert fragment in info.value.message
