"""JSON ⇄ model for notifications: the request bodies and the answers, in Graph's camelCase.

Incoming bodies are decoded by msgspec into lenient wire structs (the seed page sends
`displayTimeToLive` as a string and names in any case), then normalised into `model` values with
errors that name the offending field (the decoding itself is `wire.py`). Outgoing notifications
are encoded from `NotificationOut`.
"""

from __future__ import annotations

import re
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from herald.api.wire import (
    Wire,
    camel,
    choice,
    decode_open,
    instant,
    integer,
    without_annotations,
)
from herald.errors import InvalidRequest, PayloadTooLarge
from herald.fields import string
from herald.limits import Limits
from herald.model import (
    ALL_PLATFORMS,
    Content,
    EndpointFallback,
    FallbackPolicy,
    Notification,
    Payload,
    Platform,
    Priority,
    ReadState,
    StatePatch,
    TargetPolicy,
    UserActionState,
    VisualContent,
)

MAX_ID_LENGTH = 256
MAX_GROUP_LENGTH = 256
MAX_DISPLAY_TTL = 30 * 86_400


class VisualIn(Wire):
    title: Any = None
    body: Any = None
    odata_type: str | None = msgspec.field(default=None, name="@odata.type")


class PayloadIn(Wire):
    raw_content: Any = None
    visual_content: VisualIn | None = None
    odata_type: str | None = msgspec.field(default=None, name="@odata.type")


class TargetPolicyIn(Wire):
    platform_types: Any = None
    odata_type: str | None = msgspec.field(default=None, name="@odata.type")


class EndpointFallbackIn(Wire):
    platform_types: Any = None
    fallback_delay_in_seconds: Any = None
    visual_content: VisualIn | None = None


class FallbackPolicyIn(Wire):
    endpoint_fallback: EndpointFallbackIn | None = None


class NotificationIn(Wire):
    """A POST body. Server-managed fields are accepted only so we can say they are read-only."""

    target_host_name: Any = None
    app_notification_id: Any = None
    group_name: Any = None
    payload: PayloadIn | None = None
    target_policy: TargetPolicyIn | None = None
    priority: Any = None
    display_time_to_live: Any = None
    expiration_date_time: Any = None
    fallback_policy: FallbackPolicyIn | None = None
    id: Any = None
    created_date_time: Any = None
    last_modified_date_time: Any = None
    read_state: Any = None
    user_action_state: Any = None
    odata_type: str | None = msgspec.field(default=None, name="@odata.type")


READ_ONLY_ON_POST = ("id", "created_date_time", "last_modified_date_time")
STATE_ON_POST = ("read_state", "user_action_state")


class NotificationPatchIn(Wire):
    read_state: Any = None
    user_action_state: Any = None
    group_name: Any = None
    payload: PayloadIn | None = None
    priority: Any = None
    display_time_to_live: Any = None
    expiration_date_time: Any = None
    id: Any = None
    target_host_name: Any = None
    app_notification_id: Any = None
    target_policy: Any = None
    # UNSET, not None, when absent: `"fallbackPolicy": null` is a value (none) to compare.
    fallback_policy: Any = msgspec.UNSET
    created_date_time: Any = None
    last_modified_date_time: Any = None
    odata_type: str | None = msgspec.field(default=None, name="@odata.type")


READ_ONLY_ON_PATCH = (
    "id",
    "target_host_name",
    "app_notification_id",
    "target_policy",
    "fallback_policy",
    "created_date_time",
    "last_modified_date_time",
)


def accepted(struct: type[msgspec.Struct], refused: tuple[str, ...]) -> tuple[str, ...]:
    """Wire names a request body may set: the struct's fields minus those it only refuses."""
    names = zip(struct.__struct_fields__, struct.__struct_encode_fields__, strict=True)
    return tuple(wire for name, wire in names if name not in refused and name != "odata_type")


CREATE_FIELDS = accepted(NotificationIn, READ_ONLY_ON_POST + STATE_ON_POST)
UPDATE_FIELDS = accepted(NotificationPatchIn, READ_ONLY_ON_PATCH)

_POST_DECODER = msgspec.json.Decoder(NotificationIn)
_PATCH_DECODER = msgspec.json.Decoder(NotificationPatchIn)

# An open-type property's name: an OData SimpleIdentifier, at most 128 characters.
OPEN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


PRIORITIES: dict[str, Priority] = {p.value.lower(): p for p in Priority} | {
    "0": Priority.NONE,
    "1": Priority.HIGH,
    "2": Priority.LOW,
}
PLATFORMS: dict[str, Platform] = {p.value.lower(): p for p in Platform}
READ_STATES: dict[str, ReadState] = {r.value: r for r in ReadState}
ACTION_STATES: dict[str, UserActionState] = {a.value: a for a in UserActionState} | {
    "nointeraction": UserActionState.NONE
}


def _platforms(value: Any, field: str, default: tuple[Platform, ...]) -> tuple[Platform, ...]:
    if value is None:
        return default
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise InvalidRequest(f"'{field}' must be a non-empty list of platform names.", target=field)
    if len(items) > len(PLATFORMS):
        raise InvalidRequest(f"'{field}' lists more platforms than exist.", target=field)
    key = tuple(items) if all(type(v) is str for v in items) else None
    known = _PLATFORM_SETS.get(key) if key is not None else None
    if known is not None:
        return known
    chosen = {choice(v, field, PLATFORMS) for v in items}
    result = tuple(p for p in ALL_PLATFORMS if p in chosen)
    if key is not None and len(_PLATFORM_SETS) < 1024:  # apps send the same few lists
        _PLATFORM_SETS[key] = result
    return result


_PLATFORM_SETS: dict[tuple[str, ...], tuple[Platform, ...]] = {}


def _visual(v: VisualIn | None, field: str, required: bool) -> VisualContent | None:
    if v is None:
        if required:
            raise InvalidRequest(f"'{field}' is required.", target=field)
        return None
    title = string(v.title, f"{field}.title", 1024, required=True)
    body = string(v.body, f"{field}.body", 4096)
    assert title is not None
    return VisualContent(title=title, body=body)


def payload(p: PayloadIn | None, max_bytes: int) -> Payload:
    if p is None:
        raise InvalidRequest("'payload' is required.", target="payload")
    # No length check here: the encoded-size check below answers 413 for anything too big.
    raw = string(p.raw_content, "payload.rawContent", sys.maxsize)
    visual = _visual(p.visual_content, "payload.visualContent", required=False)
    if raw is None and visual is None:
        raise InvalidRequest(
            "'payload' needs 'rawContent' or 'visualContent' (or both).", target="payload"
        )
    result = Payload(raw_content=raw, visual_content=visual)
    size = len(msgspec.json.encode(result))
    if size > max_bytes:
        raise PayloadTooLarge(
            f"'payload' is {size} bytes encoded; the limit is {max_bytes} bytes so that it fits "
            "platform push limits."
        )
    return result


def _fallback(f: FallbackPolicyIn | None, targets: tuple[Platform, ...]) -> FallbackPolicy | None:
    if f is None:
        return None
    e = f.endpoint_fallback
    name = "fallbackPolicy.endpointFallback"
    if e is None:
        raise InvalidRequest(f"'{name}' is required in 'fallbackPolicy'.", target=name)
    platforms = _platforms(e.platform_types, f"{name}.platformTypes", ())
    if platforms != (Platform.IOS,):
        raise InvalidRequest(f"'{name}.platformTypes' supports only 'iOS'.", target=name)
    if Platform.IOS not in targets:
        raise InvalidRequest(
            "'fallbackPolicy' needs 'iOS' in 'targetPolicy.platformTypes'.", target=name
        )
    delay = integer(e.fallback_delay_in_seconds, f"{name}.fallbackDelayInSeconds", 60, 600)
    if delay is None:
        raise InvalidRequest(f"'{name}.fallbackDelayInSeconds' is required.", target=name)
    visual = _visual(e.visual_content, f"{name}.visualContent", required=True)
    assert visual is not None
    return FallbackPolicy(EndpointFallback(platforms, delay, visual))


def expiration(value: Any, now: datetime, limits: Limits, field: str) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRequest(f"'{field}' must be an ISO 8601 date-time string.", target=field)
    try:
        when = datetime.fromisoformat(value.replace("z", "Z"))
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        when = when.astimezone(UTC)
    except (ValueError, OverflowError):  # overflow: year 9999 with a negative offset
        raise InvalidRequest(
            f"'{field}' is not a valid ISO 8601 date-time: {value[:64]!r}.", target=field
        ) from None
    if when <= now:
        raise InvalidRequest(f"'{field}' is in the past.", target=field)
    latest = now + timedelta(seconds=limits.max_ttl)
    if when > latest:
        if not limits.clamp_ttl:
            days = limits.max_ttl / 86_400
            raise InvalidRequest(f"'{field}' is more than {days:g} days ahead.", target=field)
        when = latest
    return when


def _reject_present(body: msgspec.Struct, names: tuple[str, ...], why: str) -> None:
    for name in names:
        if getattr(body, name) is not None:
            wire_name = camel(name)
            raise InvalidRequest(f"'{wire_name}' {why}", target=wire_name)


def content(body: bytes, now: datetime, limits: Limits, host: str) -> Content:
    """Validate a POST body into `Content` (targetHostName defaults to the caller's host)."""
    n: NotificationIn
    n, given = decode_open(body, _POST_DECODER, NotificationIn)
    extra = open_properties(given, limits.max_payload_bytes, nulls=False)
    _reject_present(n, READ_ONLY_ON_POST, "is read-only and cannot be set.")
    _reject_present(n, STATE_ON_POST, "cannot be set on create; PATCH the notification instead.")
    targets = TargetPolicy(
        _platforms(
            n.target_policy.platform_types if n.target_policy else None,
            "targetPolicy.platformTypes",
            ALL_PLATFORMS,
        )
    )
    pay = payload(n.payload, limits.max_payload_bytes)
    priority = choice(n.priority, "priority", PRIORITIES) if n.priority is not None else None
    if priority is None:
        priority = Priority.HIGH if pay.visual_content is not None else Priority.NONE
    expires = expiration(n.expiration_date_time, now, limits, "expirationDateTime")
    return Content(
        target_host_name=string(n.target_host_name, "targetHostName", 253) or host,
        app_notification_id=string(n.app_notification_id, "appNotificationId", MAX_ID_LENGTH),
        group_name=string(n.group_name, "groupName", MAX_GROUP_LENGTH),
        payload=pay,
        target_policy=targets,
        priority=priority,
        display_time_to_live=integer(
            n.display_time_to_live, "displayTimeToLive", 0, MAX_DISPLAY_TTL
        ),
        expiration_date_time=expires or now + timedelta(seconds=limits.default_ttl),
        fallback_policy=_fallback(n.fallback_policy, targets.platform_types),
        extra=extra,
    )


def open_properties(given: dict[str, Any], max_bytes: int, nulls: bool) -> bytes | None:
    """The open-type properties of a body, encoded; None if there are none.

    Names are checked so that they can never shadow a declared property: a declared name in
    another case is a typo (400 saying so), names are OData identifiers, and `notification` is
    refused (a body wrapped in it is a known mistake). A null value
    means "absent" (on PATCH it removes the property: `nulls=True` keeps it for that)."""
    for name in given:
        if name == "notification":  # the 2019 docs' example wrapped the body in one
            raise InvalidRequest(
                'Send the notification object itself, not wrapped in {"notification": …}.',
                target=name,
            )
        declared = _DECLARED.get(name.lower())
        if declared is not None:
            raise InvalidRequest(
                f"Unknown property '{name}': property names are case-sensitive; "
                f"did you mean '{declared}'?",
                target=name,
            )
        if not OPEN_NAME.fullmatch(name):
            raise InvalidRequest(
                f"'{name[:64]}' cannot be the name of an open property: use letters, digits "
                "and '_', not starting with a digit, at most 128 characters.",
                target=name[:64],
            )
    kept = given if nulls else {k: v for k, v in given.items() if v is not None}
    if not kept:
        return None
    encoded = msgspec.json.encode(kept)
    if len(encoded) > max_bytes:
        raise PayloadTooLarge(
            f"The open properties are {len(encoded)} bytes encoded; the limit is {max_bytes} bytes."
        )
    return encoded


def state_patch(body: bytes, now: datetime, limits: Limits) -> tuple[StatePatch, dict[str, Any]]:
    """Validate a PATCH body: (the patch, the read-only properties it repeats, by wire name).

    Fields left out stay as they are. Read-only properties may be sent back unchanged (a client
    that GETs, edits and PATCHes the whole object does); `check_unchanged` compares them with
    the stored notification."""
    p: NotificationPatchIn
    p, extra = decode_open(body, _PATCH_DECODER, NotificationPatchIn)

    def opt(value: Any, field: str, members: dict[str, Any]) -> Any:
        return None if value is None else choice(value, field, members)

    patch = StatePatch(
        read_state=opt(p.read_state, "readState", READ_STATES),
        user_action_state=opt(p.user_action_state, "userActionState", ACTION_STATES),
        group_name=string(p.group_name, "groupName", MAX_GROUP_LENGTH),
        payload=payload(p.payload, limits.max_payload_bytes) if p.payload is not None else None,
        priority=opt(p.priority, "priority", PRIORITIES),
        display_time_to_live=integer(
            p.display_time_to_live, "displayTimeToLive", 0, MAX_DISPLAY_TTL
        ),
        expiration_date_time=expiration(p.expiration_date_time, now, limits, "expirationDateTime"),
        extra=open_properties(extra, limits.max_payload_bytes, nulls=True),
        max_extra_bytes=limits.max_payload_bytes,
    )
    read_only = {
        camel(name): getattr(p, name)
        for name in READ_ONLY_ON_PATCH
        if getattr(p, name) not in (None, msgspec.UNSET)
        or (name == "fallback_policy" and p.fallback_policy is None)
    }
    if patch == StatePatch(max_extra_bytes=limits.max_payload_bytes) and not read_only:
        raise InvalidRequest("The PATCH body changes nothing.", target="body")
    return patch, read_only


def check_unchanged(given: dict[str, Any], n: Notification) -> None:
    """Refuse a PATCH that would change a read-only property of `n` (400 naming it)."""
    for name, value in given.items():
        if not _same(name, value, n):
            raise InvalidRequest(
                f"'{name}' is read-only: send its current value or leave it out.", target=name
            )


def _same(name: str, value: Any, n: Notification) -> bool:
    if name == "id":
        return isinstance(value, str) and value.lower() == n.id.lower()
    if name == "targetHostName":
        return isinstance(value, str) and value.lower() == n.target_host_name.lower()
    if name == "appNotificationId":
        return isinstance(value, str) and value == n.app_notification_id
    if name == "targetPolicy":
        given = value.get("platformTypes") if isinstance(value, dict) else None
        return _platforms(given, name, ALL_PLATFORMS) == n.target_policy.platform_types
    if name == "fallbackPolicy":
        if value is None or n.fallback_policy is None:
            return value is None and n.fallback_policy is None
        try:
            given_policy = msgspec.convert(without_annotations(value), FallbackPolicyIn)
        except msgspec.ValidationError:
            return False
        return _fallback(given_policy, n.target_policy.platform_types) == n.fallback_policy
    when = instant(value, name)
    if name == "createdDateTime":
        return when == n.created_date_time
    # lastModifiedDateTime moves with every write: a value from an earlier read is unchanged
    # for the client that read it, one the notification cannot have had is not.
    return n.created_date_time <= when <= n.last_modified_date_time


# -- output ------------------------------------------------------------------------------------


class NotificationOut(msgspec.Struct, rename="camel"):
    odata_context: str | None = msgspec.field(name="@odata.context")
    odata_etag: str = msgspec.field(name="@odata.etag")
    id: str
    target_host_name: str
    app_notification_id: str
    group_name: str | None
    payload: Payload
    target_policy: TargetPolicy
    priority: Priority
    display_time_to_live: int | None
    expiration_date_time: datetime
    fallback_policy: FallbackPolicy | None
    created_date_time: datetime
    last_modified_date_time: datetime
    read_state: ReadState
    user_action_state: UserActionState


def etag(n: Notification) -> str:
    return f'W/"{n.version}"'


def out(n: Notification, context: str | None) -> NotificationOut:
    return NotificationOut(
        odata_context=context,
        odata_etag=etag(n),
        id=n.id,
        target_host_name=n.target_host_name,
        app_notification_id=n.app_notification_id,
        group_name=n.group_name,
        payload=n.payload,
        target_policy=n.target_policy,
        priority=n.priority,
        display_time_to_live=n.display_time_to_live,
        expiration_date_time=n.expiration_date_time,
        fallback_policy=n.fallback_policy,
        created_date_time=n.created_date_time,
        last_modified_date_time=n.last_modified_date_time,
        read_state=n.read_state,
        user_action_state=n.user_action_state,
    )


_ENCODER = msgspec.json.Encoder()
_WIRE_NAMES = {camel(f): f for f in NotificationOut.__struct_fields__}
# Every declared property, by lower-cased wire name (open properties may not take these).
_DECLARED = {name.lower(): name for name in _WIRE_NAMES if not name.startswith("odata")}


def encode_entity(n: Notification, context: str | None) -> bytes:
    """A notification as its JSON object, open properties last."""
    raw = _ENCODER.encode(out(n, context))
    return raw if n.extra is None else raw[:-1] + b"," + n.extra[1:]


def to_builtins(n: Notification, select: tuple[str, ...] | None = None) -> dict[str, Any]:
    """A notification as a dict of wire names, optionally reduced to `select` (+ id, etag)."""
    data: dict[str, Any] = msgspec.to_builtins(out(n, None))
    data.pop("@odata.context")
    if n.extra is not None:
        data.update(msgspec.json.decode(n.extra))
    if select is not None:
        keep = {"id", "@odata.etag", *select}
        data = {k: v for k, v in data.items() if k in keep}
    return data
