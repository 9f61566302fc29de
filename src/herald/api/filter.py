"""`$filter` of `GET .../notifications` -> a `herald.query.Filter`.

A small hand-written tokenizer and recursive-descent parser; no dependency. Everything the client
gets wrong raises `InvalidRequest` whose `target` is `$filter` and whose message says what is
wrong, where, and what is supported. See docs/odata.md for the supported subset.

Property names, keywords/operators and enum values are case-insensitive; string literals are
compared verbatim.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from enum import StrEnum
from typing import Final, Literal

from herald.errors import InvalidRequest
from herald.model import Priority, ReadState, UserActionState
from herald.query import FIELDS, And, Comparison, Filter, In, Not, Op, Or, Value

# camelCase wire name -> snake_case `Query` field name (filterable and orderable).
WIRE_FIELDS: Final[Mapping[str, str]] = {
    "id": "id",
    "appNotificationId": "app_notification_id",
    "groupName": "group_name",
    "readState": "read_state",
    "userActionState": "user_action_state",
    "priority": "priority",
    "createdDateTime": "created_date_time",
    "lastModifiedDateTime": "last_modified_date_time",
    "expirationDateTime": "expiration_date_time",
}
assert set(WIRE_FIELDS.values()) == set(FIELDS)

MAX_FILTER_LENGTH: Final = 2000
MAX_FILTER_DEPTH: Final = 32

_FILTER: Final = "$filter"
_ORDER_OPS: Final[frozenset[str]] = frozenset({"lt", "le", "gt", "ge"})
_OPS: Final[tuple[Op, ...]] = ("eq", "ne", "lt", "le", "gt", "ge")
_KEYWORDS: Final[frozenset[str]] = frozenset({*_OPS, "and", "or", "not", "in", "null"})
_OP_BY_NAME: Final[Mapping[str, Op]] = {op: op for op in _OPS}
# Qualified type names accepted in typed enum literals, e.g. microsoft.graph.readState'read'.
_ENUM_TYPES: Final[Mapping[type, str]] = {
    ReadState: "microsoft.graph.readState",
    UserActionState: "microsoft.graph.userActionState",
    Priority: "microsoft.graph.priority",
}

PROPERTY_BY_LOWER: Final[Mapping[str, str]] = {name.lower(): name for name in WIRE_FIELDS}
PROPERTIES_TEXT: Final = ", ".join(WIRE_FIELDS)


def clip(text: str, limit: int = 40) -> str:
    """Client input echoed in an error message, shortened so the message stays readable."""
    return text if len(text) <= limit else text[:limit] + "..."


# --------------------------------------------------------------------------------------------------
# $filter tokenizer

_Kind = Literal["(", ")", ",", "string", "word", "bare", "typed", "end"]


@dataclass(frozen=True, slots=True)
class _Token:
    kind: _Kind
    text: str  # source text (word/bare/typed type name) or decoded value (string)
    pos: int  # 0-based offset into the filter text
    value: str = ""  # the quoted part of a typed literal


_WHITESPACE: Final = frozenset(" \t\r\n")
_WORD_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_BARE_RE: Final = re.compile(r"[0-9+\-][0-9A-Za-z:.+\-]*")


def _fail(message: str, pos: int | None = None) -> InvalidRequest:
    where = "" if pos is None else f" at position {pos + 1}"
    return InvalidRequest(f"Invalid $filter{where}: {message}.", target=_FILTER)


def _describe(token: _Token) -> str:
    if token.kind == "end":
        return "end of filter"
    if token.kind == "string":
        return "'" + clip(token.text.replace("'", "''")) + "'"
    if token.kind == "typed":
        return clip(token.text) + "'" + clip(token.value.replace("'", "''")) + "'"
    return f"'{clip(token.text)}'"


_PUNCTUATION: Final[Mapping[str, _Kind]] = {"(": "(", ")": ")", ",": ","}


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    pos = 0
    while pos < len(text):
        char = text[pos]
        if char in _WHITESPACE:
            pos += 1
            continue
        if char in _PUNCTUATION:
            token, end = _Token(_PUNCTUATION[char], char, pos), pos + 1
        elif char == "'":
            value, end = _scan_string(text, pos)
            token = _Token("string", value, pos)
        else:
            token, end = _scan_word(text, pos)
        tokens.append(token)
        pos = end
    tokens.append(_Token("end", "", len(text)))
    return tokens


def _scan_string(text: str, start: int) -> tuple[str, int]:
    """Scan a quoted literal starting at `start` ('); return its value and the index after it."""
    parts: list[str] = []
    pos = start + 1
    while True:
        quote = text.find("'", pos)
        if quote < 0:
            raise _fail(
                "unterminated string literal (close it with ' and write a quote as '')", start
            )
        parts.append(text[pos:quote])
        if text.startswith("''", quote):
            parts.append("'")
            pos = quote + 2
        else:
            return "".join(parts), quote + 1


def _scan_word(text: str, pos: int) -> tuple[_Token, int]:
    """A word (identifier, keyword), a typed literal (name'value') or a bare literal."""
    match = _WORD_RE.match(text, pos)
    if match:
        end = match.end()
        if text.startswith("'", end):
            value, end = _scan_string(text, end)
            return _Token("typed", match.group(), pos, value), end
        return _Token("word", match.group(), pos), end
    match = _BARE_RE.match(text, pos)
    if match:
        return _Token("bare", match.group(), pos), match.end()
    raise _fail(f"unexpected character {text[pos]!r}", pos)


# --------------------------------------------------------------------------------------------------
# $filter parser


def parse_filter(text: str) -> Filter:
    """Parse a `$filter` expression; raise `InvalidRequest(target="$filter")` if it is invalid."""
    if len(text) > MAX_FILTER_LENGTH:
        raise _fail(
            f"the filter is {len(text)} characters long; the maximum is {MAX_FILTER_LENGTH}"
        )
    if "\x00" in text:
        raise _fail("NUL characters are not allowed", text.index("\x00"))
    if not text.strip():
        raise _fail("the filter is empty")
    return _Parser(_tokenize(text)).parse()


class _Parser:
    def __init__(self, tokens: list[_Token]) -> None:
        self._tokens = tokens
        self._index = 0
        self._depth = 0

    # -- token helpers

    def _peek(self) -> _Token:
        return self._tokens[self._index]

    def _next(self) -> _Token:
        token = self._tokens[self._index]
        if token.kind != "end":
            self._index += 1
        return token

    def _at_keyword(self, keyword: str) -> bool:
        token = self._peek()
        return token.kind == "word" and token.text.lower() == keyword

    def _expect(self, kind: _Kind, what: str) -> _Token:
        token = self._next()
        if token.kind != kind:
            raise _fail(f"expected {what} but found {_describe(token)}", token.pos)
        return token

    # -- grammar: or > and > not > primary

    def parse(self) -> Filter:
        result = self._or()
        token = self._peek()
        if token.kind != "end":
            raise _fail(f"unexpected {_describe(token)} after a complete expression", token.pos)
        return result

    def _or(self) -> Filter:
        left = self._and()
        while self._at_keyword("or"):
            self._next()
            left = Or(left, self._and())
        return left

    def _and(self) -> Filter:
        left = self._unary()
        while self._at_keyword("and"):
            self._next()
            left = And(left, self._unary())
        return left

    def _unary(self) -> Filter:
        if not self._at_keyword("not"):
            return self._primary()
        self._enter(self._next())
        operand = self._unary()
        self._depth -= 1
        return Not(operand)

    def _primary(self) -> Filter:
        token = self._peek()
        if token.kind != "(":
            return self._predicate()
        self._enter(self._next())
        inner = self._or()
        self._expect(")", "')'")
        self._depth -= 1
        return inner

    def _enter(self, token: _Token) -> None:
        self._depth += 1
        if self._depth > MAX_FILTER_DEPTH:
            raise _fail(f"expression nested deeper than {MAX_FILTER_DEPTH} levels", token.pos)

    # -- predicates

    def _predicate(self) -> Filter:
        wire = self._property()
        field = WIRE_FIELDS[wire]
        token = self._next()
        op = token.text.lower() if token.kind == "word" else ""
        if op == "in":
            return In(field, self._in_list(wire))
        if op not in _OPS:
            raise _fail(
                f"expected an operator (eq, ne, lt, le, gt, ge or in) after '{wire}'"
                f" but found {_describe(token)}",
                token.pos,
            )
        return self._comparison(wire, op, token)

    def _property(self) -> str:
        token = self._next()
        if token.kind == "word" and token.text.lower() not in _KEYWORDS:
            wire = PROPERTY_BY_LOWER.get(token.text.lower())
            if wire is not None:
                return wire
            if self._peek().kind == "(":
                raise _fail(
                    f"function '{clip(token.text)}' is not supported; use eq, ne, lt, le, gt,"
                    " ge, in, and, or, not and parentheses",
                    token.pos,
                )
            raise _fail(
                f"unknown property '{clip(token.text)}'; filterable: {PROPERTIES_TEXT}", token.pos
            )
        raise _fail(f"expected a property name but found {_describe(token)}", token.pos)

    def _comparison(self, wire: str, op: str, op_token: _Token) -> Comparison:
        kind = FIELDS[WIRE_FIELDS[wire]]
        if op in _ORDER_OPS and issubclass(kind, StrEnum):
            raise _fail(
                f"operator '{op}' is not supported on enum property '{wire}'; use eq, ne or in",
                op_token.pos,
            )
        token = self._next()
        value = _value(wire, kind, token)
        if value is None and op not in ("eq", "ne"):
            raise _fail(f"null can only be compared with eq or ne, not '{op}'", token.pos)
        return Comparison(WIRE_FIELDS[wire], _as_op(op), value)

    def _in_list(self, wire: str) -> tuple[Value, ...]:
        kind = FIELDS[WIRE_FIELDS[wire]]
        self._expect("(", f"'(' after '{wire} in'")
        if self._peek().kind == ")":
            raise _fail("an 'in' list needs at least one value", self._peek().pos)
        values: list[Value] = []
        while True:
            token = self._next()
            value = _value(wire, kind, token)
            if value is None:
                raise _fail(f"null is not allowed in an 'in' list; use '{wire} eq null'", token.pos)
            values.append(value)
            if self._next_is_close_of_list():
                return tuple(values)

    def _next_is_close_of_list(self) -> bool:
        token = self._next()
        if token.kind in (")", ","):
            return token.kind == ")"
        raise _fail(f"expected ',' or ')' in an 'in' list but found {_describe(token)}", token.pos)


def _as_op(op: str) -> Op:
    return _OP_BY_NAME[op]


# --------------------------------------------------------------------------------------------------
# Literal values


def _value(wire: str, kind: type, token: _Token) -> Value:
    if token.kind == "word" and token.text.lower() == "null":
        return None
    if issubclass(kind, StrEnum):
        return _enum_value(wire, kind, token)
    if kind is datetime:
        return _datetime_value(wire, token)
    return _string_value(wire, token)


def _string_value(wire: str, token: _Token) -> str:
    if token.kind == "string":
        return token.text
    if token.kind in ("word", "bare"):
        raise _fail(
            f"expected a string literal for '{wire}' but found {_describe(token)};"
            " quote strings in single quotes, e.g. 'abc'",
            token.pos,
        )
    raise _fail(f"expected a string literal for '{wire}' but found {_describe(token)}", token.pos)


def _enum_value(wire: str, kind: type[StrEnum], token: _Token) -> StrEnum:
    allowed = ", ".join(f"'{member.value}'" for member in kind)
    type_name = _ENUM_TYPES[kind]
    if token.kind == "typed" and token.text.lower() != type_name.lower():
        raise _fail(
            f"type '{clip(token.text)}' does not match property '{wire}' (expected {type_name})",
            token.pos,
        )
    if token.kind not in ("string", "typed"):
        raise _fail(
            f"expected a quoted value for enum property '{wire}' but found {_describe(token)};"
            f" allowed: {allowed}",
            token.pos,
        )
    text = token.value if token.kind == "typed" else token.text
    for member in kind:
        if member.value.lower() == text.lower():
            return member
    raise _fail(f"'{clip(text)}' is not a valid value for '{wire}'; allowed: {allowed}", token.pos)


_DATETIME_RE: Final = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,12}))?)?"
    r"(?:([Zz])|([+-])(\d{2}):(\d{2}))?",
    re.ASCII,
)


def _datetime_value(wire: str, token: _Token) -> datetime:
    if token.kind not in ("bare", "string"):
        raise _fail(
            f"expected a DateTimeOffset for '{wire}' (e.g. 2026-11-27T10:00:00Z)"
            f" but found {_describe(token)}",
            token.pos,
        )
    parsed = _parse_datetime(token.text)
    if isinstance(parsed, str):
        raise _fail(
            f"'{clip(token.text)}' is not a valid DateTimeOffset for '{wire}': {parsed}", token.pos
        )
    return parsed


def _parse_datetime(text: str) -> datetime | str:
    """An aware UTC datetime, or a reason why `text` is not an OData DateTimeOffset."""
    match = _DATETIME_RE.fullmatch(text)
    if match is None:
        return "expected e.g. 2026-11-27T10:00:00Z or 2026-11-27T10:00:00.5+02:00"
    year, month, day, hour, minute, second, fraction, zulu, sign, off_h, off_m = match.groups()
    if not zulu and not sign:
        return (
            "a time zone is required: append 'Z' or an offset such as '+02:00'"
            " (percent-encode '+' as %2B in a URL)"
        )
    if int(off_h or 0) > 23 or int(off_m or 0) > 59:
        return f"the offset must be between -23:59 and +23:59, got {sign}{off_h}:{off_m}"
    micros = int((fraction or "0").ljust(6, "0")[:6])
    try:
        offset = timedelta(hours=int(off_h or 0), minutes=int(off_m or 0))
        tz = timezone(-offset if sign == "-" else offset)
        local = datetime(
            int(year), int(month), int(day), int(hour), int(minute), int(second or 0), micros, tz
        )
        return local.astimezone(UTC)
    except (ValueError, OverflowError) as exc:
        return str(exc)
