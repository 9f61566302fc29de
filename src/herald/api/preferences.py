"""`/me/notificationPreferences` and `/users/{user}/notificationPreferences`: the signed-in
user's preferences for the calling app (docs/api.md, "Notification preferences"). The same access
as the user's notifications: a delegated token for its own user (a device), an app-only token
for any user of the app (its server)."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from herald import preferences
from herald.access import Caller
from herald.api import wire
from herald.api.requests import caller, json_response, read_body, services, version
from herald.errors import PreconditionFailed
from herald.preferences import NotificationPreferences, StoredPreferences

MAX_BODY = 64 * 1024
NEVER_SET = StoredPreferences(
    preferences=NotificationPreferences(), version=0, last_modified_date_time=None
)
_DECODER = msgspec.json.Decoder(preferences.PreferencesIn)
_ENCODER = msgspec.json.Encoder()


def etag(stored: StoredPreferences) -> str:
    return f'W/"{stored.version}"'


def _if_match(request: Request, current: StoredPreferences) -> int | None:
    """The version an If-Match header demands (None: absent or `*`); one of a list of tags
    that is the current one is taken (the store re-checks it)."""
    value = request.headers.get("if-match")
    if value is None or value.strip() == "*":
        return None
    versions = set()
    for tag in value.split(","):
        tag = tag.strip().removeprefix("W/").strip('"')
        if tag.isascii() and tag.isdigit() and len(tag) <= 18:
            versions.add(int(tag))
    if current.version in versions:
        return current.version
    raise PreconditionFailed(f"If-Match {value[:64]!r} does not match the current ETag.")


def _entity(request: Request, c: Caller, stored: StoredPreferences) -> Response:
    base = services(request).settings.base_url
    user = quote(c.user_id, safe="")
    body: dict[str, Any] = {
        "@odata.context": f"{base}/{version(request)}/$metadata#users('{user}')"
        "/notificationPreferences/$entity",
        "@odata.etag": etag(stored),
        **preferences.document(stored),
    }
    return json_response(_ENCODER.encode(body), headers={"ETag": etag(stored)})


async def _current(request: Request, c: Caller) -> StoredPreferences:
    found = await services(request).preferences.get_preferences(c.user_id, c.app.host_name)
    return found or NEVER_SET


async def get_one(request: Request) -> Response:
    c = await caller(request)
    return _entity(request, c, await _current(request, c))


async def patch_one(request: Request) -> Response:
    """Replace the fields the body gives (the others are kept); `quietHours: null` turns quiet
    hours off. Pushes already held are re-timed to the new quiet hours (now, if none)."""
    c = await caller(request)
    body = wire.decode_body(await read_body(request, MAX_BODY), _DECODER)
    current = await _current(request, c)
    wanted = preferences.patched(current.preferences, body)
    if_match = _if_match(request, current)
    s = services(request)
    now = s.feed.clock()
    quiet = wanted.quiet_hours
    release = (preferences.quiet_until(quiet, now) if quiet is not None else None) or now
    stored = await s.preferences.put_preferences(
        c.user_id, c.app.host_name, wanted, if_match, now, release
    )
    return _entity(request, c, stored)


def routes() -> list[BaseRoute]:
    table: list[BaseRoute] = []
    for prefix in ("/me", "/users/{user}"):
        base = f"{prefix}/notificationPreferences"
        table += [
            Route(base, get_one, methods=["GET"]),
            Route(base, patch_one, methods=["PATCH"]),
        ]
    return table


# -- /openapi.json ---------------------------------------------------------------------------

_TIME = {"type": "string", "pattern": r"^\d\d:\d\d(:\d\d(\.\d+)?)?$", "examples": ["22:00"]}
SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "The user's notification preferences for the calling app (docs/api.md). "
    "They affect alerting pushes only; notifications are stored and synced regardless.",
    "properties": {
        "mutedGroups": {
            "type": "array",
            "maxItems": preferences.MAX_MUTED_GROUPS,
            "items": {"type": "string", "minLength": 1, "maxLength": preferences.MAX_GROUP_LENGTH},
            "description": "No alerting push for a notification of these groupNames.",
        },
        "mutedPlatforms": {
            "type": "array",
            "items": {"enum": [p.value for p in preferences.PUSH_PLATFORMS.values()]},
            "description": "No alerting push to the user's devices of these platforms.",
        },
        "quietHours": {
            "type": ["object", "null"],
            "additionalProperties": False,
            "required": ["timeZone", "startTime", "endTime"],
            "properties": {
                "timeZone": {"type": "string", "examples": ["Europe/Berlin"]},
                "startTime": _TIME,
                "endTime": _TIME,
                "daysOfWeek": {
                    "type": "array",
                    "minItems": 1,
                    "items": {"enum": list(preferences.DAYS)},
                },
                "allowHighPriority": {"type": "boolean", "default": False},
            },
        },
        "lastModifiedDateTime": {
            "type": ["string", "null"],
            "format": "date-time",
            "readOnly": True,
        },
        "@odata.etag": {"type": "string", "readOnly": True},
        "@odata.context": {"type": "string", "readOnly": True},
    },
    "additionalProperties": False,
}


def openapi_paths(err: dict[str, Any]) -> dict[str, Any]:
    """The resource's operations, at /me and at /users/{user}."""
    ref = {"$ref": "#/components/schemas/NotificationPreferences"}
    ok = {"description": "The preferences (ETag: their version)", "content": _json(ref)}
    user = {"name": "user", "in": "path", "required": True, "schema": {"type": "string"}}
    operations = {
        "get": {
            "summary": "The user's notification preferences for the calling app",
            "responses": {"200": ok, "4XX": err},
        },
        "patch": {
            "summary": "Replace the properties given (If-Match honoured); quietHours: null "
            "turns quiet hours off",
            "requestBody": {"content": _json(ref)},
            "responses": {"200": ok, "4XX": err},
        },
    }
    return {
        "/beta/me/notificationPreferences": operations,
        "/beta/users/{user}/notificationPreferences": {"parameters": [user], **operations},
    }


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}
