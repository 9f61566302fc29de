"""JSON bodies in and out: decoding into lenient wire structs with errors that name the
offending field (Graph's camelCase names), and encoding answers."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import msgspec

from herald.errors import InvalidRequest


class Wire(msgspec.Struct, rename="camel", forbid_unknown_fields=True, omit_defaults=True):
    pass


_OBJECT_DECODER = msgspec.json.Decoder(dict[str, Any])


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)


def decode_body(body: bytes, decoder: msgspec.json.Decoder[Any]) -> Any:
    if not body.strip():
        raise InvalidRequest("The request body is empty; send a JSON object.", target="body")
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise _validation_error(str(exc)) from exc
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}", target="body") from exc
    except RecursionError:
        raise InvalidRequest("The request body is nested too deeply.", target="body") from None


def decode_open(
    body: bytes, decoder: msgspec.json.Decoder[Any], struct: type[msgspec.Struct]
) -> tuple[Any, dict[str, Any]]:
    """A body of the open notification type: (its known properties as `struct`, the others).

    Instance annotations (`@odata.context`, `@odata.etag`, `name@odata.type`) are dropped at
    any depth, as Graph ignores them. Only the top level is open: an unknown property inside
    `payload` & co. is still a 400. The common body has neither, and takes the fast path.
    """
    try:
        return decode_body(body, decoder), {}
    except InvalidRequest as exc:
        if not exc.message.startswith("Unknown property"):
            raise
    data: dict[str, Any] = decode_body(body, _OBJECT_DECODER)
    known: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    fields = set(struct.__struct_encode_fields__)
    for name, value in data.items():
        if "@" in name:
            continue
        if name in fields:
            known[name] = without_annotations(value)
        else:
            extra[name] = value
    try:
        return msgspec.convert(known, struct), extra
    except msgspec.ValidationError as exc:
        raise _validation_error(str(exc)) from exc


def without_annotations(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: without_annotations(v) for k, v in value.items() if "@" not in k}
    return value


def _validation_error(text: str) -> InvalidRequest:
    # msgspec says e.g. "Object contains unknown field `notification`" or "Expected `object`,
    # got `array`" with "- at `$.payload`"; turn that into a Graph message naming the field.
    message, _, where = text.partition(" - at `")
    path = where.rstrip("`").removeprefix("$").lstrip(".") or "body"
    if "unknown field" in message:
        name = message.split("`")[1]
        target = f"{path}.{name}" if path != "body" else name
        return InvalidRequest(f"Unknown property '{target}' in the request body.", target=target)
    if path == "body" and "got `array`" in message:
        return InvalidRequest(
            "The request body must be a single notification object, not an array.", target="body"
        )
    return InvalidRequest(f"Invalid value for '{path}': {message}.", target=path)


def choice(value: Any, field: str, members: dict[str, Any]) -> Any:
    if isinstance(value, bool):
        raise InvalidRequest(f"'{field}' has an invalid value.", target=field)
    key = str(value).lower() if isinstance(value, str | int) else None
    if key is None or key not in members:
        allowed = ", ".join(sorted({str(m) for m in members.values()}))
        raise InvalidRequest(
            f"'{field}' has an invalid value {value!r}; allowed: {allowed}.", target=field
        )
    return members[key]


_INTEGER = re.compile(r"-?[0-9]{1,10}")  # ASCII digits only: str.isdigit() accepts "²"


def integer(value: Any, field: str, low: int, high: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"'{field}' must be an integer number of seconds.", target=field)
    if not low <= value <= high:
        raise InvalidRequest(f"'{field}' must be between {low} and {high}.", target=field)
    return value


def instant(value: Any, field: str) -> datetime:
    if isinstance(value, str):
        try:
            when = datetime.fromisoformat(value.replace("z", "Z"))
            return (when if when.tzinfo else when.replace(tzinfo=UTC)).astimezone(UTC)
        except (ValueError, OverflowError):
            pass
    raise InvalidRequest(f"'{field}' is not a valid ISO 8601 date-time.", target=field)


_ENCODER = msgspec.json.Encoder()


def encode(value: Any) -> bytes:
    return _ENCODER.encode(value)
