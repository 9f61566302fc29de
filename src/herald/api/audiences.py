"""Audiences and sends to many users, for app servers (app-only tokens): docs/api.md "Audiences".

* `/notificationAudiences`: named sets of users an app maintains, with members added and
  removed in bulk (`addMembers`, `removeMembers`) and listed by page.
* `POST /sendNotification` (to `userIds`) and `POST /notificationAudiences/{id}/sendNotification`
  (to its members as of the request): 202 Accepted with a long-running operation,
  `GET /notificationOperations/{id}`. The send is stored whole before the answer;
  `herald.sends` creates each recipient's notification in the background.
"""

from __future__ import annotations

import hashlib
from typing import Any
from urllib.parse import quote

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from herald.api import schemas
from herald.api.requests import json_response, read_body, services, version
from herald.api.wire import decode_body
from herald.errors import AccessDenied, Conflict, InvalidRequest, NotFound
from herald.feed import new_id
from herald.model import App
from herald.store import Audience, Send
from herald.users import canonical

MAX_AUDIENCE_ID = 128
MAX_USER_ID = 256
MAX_DISPLAY_NAME = 256
MAX_KEY = 255
ERRORS_SHOWN = 100  # per-recipient errors in an operation's answer
BYTES_PER_ID = 260  # how much a body may grow per user id it may hold


class AudienceIn(msgspec.Struct, forbid_unknown_fields=True, rename="camel"):
    id: str
    display_name: str | None = None


class MembersIn(msgspec.Struct, forbid_unknown_fields=True, rename="camel"):
    user_ids: list[str]


class SendIn(msgspec.Struct, forbid_unknown_fields=True, rename="camel"):
    notification: msgspec.Raw
    user_ids: list[str] | None = None


_AUDIENCE = msgspec.json.Decoder(AudienceIn)
_MEMBERS = msgspec.json.Decoder(MembersIn)
_SEND = msgspec.json.Decoder(SendIn)


async def app_of(request: Request) -> App:
    """The calling app; only its server (an app-only token) manages audiences and sends."""
    access = services(request).access
    principal = await access.principal(request.headers.get("authorization"))
    if principal.user_id is not None:
        raise AccessDenied("Audiences and sends to many users need an app-only token.")
    app = await access.apps.get(principal.client_id)
    if app is None:
        raise AccessDenied(f"The app '{principal.client_id}' is not registered with Herald.")
    # One request of the app's budget (a send is one, whatever its recipients: they are paced
    # by the runner instead).
    await access.limits.check(app.host_name, None)
    return app


def _base(request: Request) -> str:
    return f"{services(request).settings.base_url}/{version(request)}"


def _audience_id(request: Request) -> str:
    value: str = request.path_params["id"]
    if not 0 < len(value) <= MAX_AUDIENCE_ID or not value.isprintable():
        raise NotFound(f"The audience {value[:64]!r} was not found.")
    return value


def _user_ids(values: list[str], limit: int) -> list[str]:
    """Each id checked and in its stored form (herald/users.py), duplicates dropped, in order."""
    if not values:
        raise InvalidRequest("userIds is empty: name at least one user.", target="userIds")
    if len(values) > limit:
        raise InvalidRequest(
            f"userIds has {len(values)} ids; at most {limit} are allowed per request.",
            target="userIds",
        )
    for v in values:
        if not 0 < len(v) <= MAX_USER_ID or not v.isprintable():
            raise InvalidRequest(f"userIds holds an invalid user id: {v[:64]!r}.", target="userIds")
    return list(dict.fromkeys(canonical(v) for v in values))


async def _body(request: Request) -> bytes:
    s = services(request).settings
    return await read_body(request, s.max_body_bytes + BYTES_PER_ID * s.send_max_recipients)


def _audience_out(request: Request, a: Audience) -> dict[str, Any]:
    return {
        "id": a.id,
        "displayName": a.display_name,
        "createdDateTime": a.created,
        "memberCount": a.members,
    }


def _json(data: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return json_response(msgspec.json.encode(data), status, headers)


# -- audiences -------------------------------------------------------------------------------


async def create_audience(request: Request) -> Response:
    app = await app_of(request)
    s = services(request)
    given = decode_body(await read_body(request), _AUDIENCE)
    if not 0 < len(given.id) <= MAX_AUDIENCE_ID or not given.id.isprintable() or "/" in given.id:
        raise InvalidRequest(
            f"id must be 1 to {MAX_AUDIENCE_ID} printable characters without '/'.", target="id"
        )
    name = given.display_name
    if name is not None and (len(name) > MAX_DISPLAY_NAME or not name.isprintable()):
        raise InvalidRequest(
            f"displayName must be at most {MAX_DISPLAY_NAME} printable characters.",
            target="displayName",
        )
    a = await s.audiences.put_audience(
        app.host_name, given.id, name, s.settings.max_audiences, s.feed.clock()
    )
    location = f"{_base(request)}/notificationAudiences/{quote(a.id, safe='')}"
    context = f"{_base(request)}/$metadata#notificationAudiences/$entity"
    body = {"@odata.context": context, **_audience_out(request, a)}
    return _json(body, 201, {"Location": location})


async def list_audiences(request: Request) -> Response:
    app = await app_of(request)
    found = await services(request).audiences.list_audiences(app.host_name)
    context = f"{_base(request)}/$metadata#notificationAudiences"
    return _json({"@odata.context": context, "value": [_audience_out(request, a) for a in found]})


async def get_audience(request: Request) -> Response:
    app = await app_of(request)
    audience = _audience_id(request)
    a = await services(request).audiences.get_audience(app.host_name, audience)
    if a is None:
        raise NotFound(f"The audience '{audience}' was not found.")
    context = f"{_base(request)}/$metadata#notificationAudiences/$entity"
    return _json({"@odata.context": context, **_audience_out(request, a)})


async def delete_audience(request: Request) -> Response:
    app = await app_of(request)
    audience = _audience_id(request)
    if not await services(request).audiences.delete_audience(app.host_name, audience):
        raise NotFound(f"The audience '{audience}' was not found.")
    return Response(status_code=204)


async def add_members(request: Request) -> Response:
    app = await app_of(request)
    s = services(request)
    audience = _audience_id(request)
    given = decode_body(await _body(request), _MEMBERS)
    users = _user_ids(given.user_ids, s.settings.send_max_recipients)
    added = await s.audiences.add_members(
        app.host_name, audience, users, s.settings.audience_max_members
    )
    return _json({"added": added})


async def remove_members(request: Request) -> Response:
    app = await app_of(request)
    s = services(request)
    audience = _audience_id(request)
    given = decode_body(await _body(request), _MEMBERS)
    users = _user_ids(given.user_ids, s.settings.send_max_recipients)
    removed = await s.audiences.remove_members(app.host_name, audience, users)
    return _json({"removed": removed})


async def list_members(request: Request) -> Response:
    """One page of members by user id; `@odata.nextLink` carries a `$skiptoken` (the last id)."""
    app = await app_of(request)
    s = services(request)
    audience = _audience_id(request)
    top = s.settings.default_page_size
    raw_top = request.query_params.get("$top")
    if raw_top is not None:
        if not raw_top.isdigit() or not 0 < int(raw_top) <= s.settings.max_page_size:
            raise InvalidRequest(f"$top must be 1 to {s.settings.max_page_size}.", target="$top")
        top = int(raw_top)
    after = request.query_params.get("$skiptoken")
    page = await s.audiences.members(app.host_name, audience, after, top + 1)
    url = f"{_base(request)}/notificationAudiences/{quote(audience, safe='')}/members"
    body: dict[str, Any] = {
        "@odata.context": f"{_base(request)}/$metadata#users",
        "value": [{"id": u} for u in page[:top]],
    }
    if len(page) > top:
        body["@odata.nextLink"] = f"{url}?$top={top}&$skiptoken={quote(page[top - 1], safe='')}"
    return _json(body)


# -- sends -----------------------------------------------------------------------------------


async def send_to_users(request: Request) -> Response:
    return await _send(request, None)


async def send_to_audience(request: Request) -> Response:
    return await _send(request, _audience_id(request))


async def _send(request: Request, audience: str | None) -> Response:
    """Accept a send: validate it, store it whole (content and recipients) and answer 202 with
    its operation. With an Idempotency-Key, a replay answers the same operation and stores
    nothing; the key with another body is refused (409), as for `POST …/notifications`."""
    app = await app_of(request)
    s = services(request)
    key = request.headers.get("idempotency-key")
    if key is not None and (not 0 < len(key) <= MAX_KEY or not key.isprintable()):
        raise InvalidRequest(
            "Idempotency-Key must be 1 to 255 printable characters.", target="Idempotency-Key"
        )
    body = await _body(request)
    fingerprint = hashlib.sha256(request.url.path.encode() + b"\x00" + body).hexdigest()
    given = decode_body(body, _SEND)
    recipients = None
    if audience is None:
        if given.user_ids is None:
            raise InvalidRequest("userIds is required.", target="userIds")
        recipients = _user_ids(given.user_ids, s.settings.send_max_recipients)
    elif given.user_ids is not None:
        raise InvalidRequest("userIds cannot be given to an audience's send.", target="userIds")
    now = s.feed.clock()
    content = schemas.content(bytes(given.notification), now, s.limits, app.host_name)
    if content.target_host_name.lower() != app.host_name.lower():
        raise AccessDenied(
            f"targetHostName '{content.target_host_name}' does not belong to the calling app."
        )
    send = Send(
        id=new_id(),
        app=app.host_name,
        idempotency_key=key,
        fingerprint=fingerprint,
        audience=audience,
        content=msgspec.msgpack.encode(content),
        total=0,
        done=0,
        failed=0,
        status="notStarted",
        created=now,
        last_action=now,
    )
    limit = s.settings.audience_max_members
    scope = f":sends:{app.host_name}"  # serialises requests with one key in this process
    async with s.idempotency_lock(scope, key or send.id):
        stored, created = await s.audiences.start_send(send, recipients, limit)
    if stored.fingerprint != fingerprint:
        raise Conflict("This Idempotency-Key was already used with a different request.")
    if created:
        s.sends.wake()
    location = f"{_base(request)}/notificationOperations/{stored.id}"
    headers = {"Location": location, "Operation-Location": location, "Retry-After": "1"}
    return _json(await _operation(request, stored), 202, headers)


async def get_operation(request: Request) -> Response:
    app = await app_of(request)
    id: str = request.path_params["id"]
    send = None
    if 0 < len(id) <= 64 and id.isprintable():
        send = await services(request).audiences.get_send(app.host_name, id)
    if send is None:
        raise NotFound(f"The operation {id[:64]!r} was not found.")
    return _json(await _operation(request, send))


async def _operation(request: Request, send: Send) -> dict[str, Any]:
    """A send as a Graph long-running operation, with its counts and per-recipient errors."""
    failures = []
    if send.failed:
        found = await services(request).audiences.send_failures(send.app, send.id, ERRORS_SHOWN)
        failures = [{"userId": f.user_id, "code": f.code, "message": f.message} for f in found]
    percent = 100 if not send.total else send.done * 100 // send.total
    body: dict[str, Any] = {
        "@odata.context": f"{_base(request)}/$metadata#notificationOperations/$entity",
        "id": send.id,
        "status": send.status,
        "createdDateTime": send.created,
        "lastActionDateTime": send.last_action,
        "finishedDateTime": send.finished,
        "audienceId": send.audience,
        "totalCount": send.total,
        "processedCount": send.done,
        "succeededCount": send.done - send.failed,
        "failedCount": send.failed,
        "percentageComplete": percent,
        "errors": failures,
    }
    if send.status == "failed":
        body["error"] = {"code": "allRecipientsFailed", "message": "No recipient was reached."}
    return body


def routes() -> list[BaseRoute]:
    base = "/notificationAudiences"
    return [
        Route(base, create_audience, methods=["POST"]),
        Route(base, list_audiences, methods=["GET"]),
        Route(f"{base}/{{id}}", get_audience, methods=["GET"]),
        Route(f"{base}/{{id}}", delete_audience, methods=["DELETE"]),
        Route(f"{base}/{{id}}/addMembers", add_members, methods=["POST"]),
        Route(f"{base}/{{id}}/removeMembers", remove_members, methods=["POST"]),
        Route(f"{base}/{{id}}/members", list_members, methods=["GET"]),
        Route(f"{base}/{{id}}/sendNotification", send_to_audience, methods=["POST"]),
        Route("/sendNotification", send_to_users, methods=["POST"]),
        Route("/notificationOperations/{id}", get_operation, methods=["GET"]),
    ]


# -- /openapi.json ---------------------------------------------------------------------------


def openapi(err: dict[str, Any], components: dict[str, Any]) -> dict[str, Any]:
    """The paths of this module, adding their schemas to `components` (api/operations.py)."""
    text, count = {"type": "string"}, {"type": "integer"}
    when = {"type": ["string", "null"], "format": "date-time"}
    ids = {"type": "array", "items": text, "minItems": 1, "maxItems": 10_000}
    components["NotificationAudience"] = {
        "type": "object",
        "properties": {
            "id": text,
            "displayName": {"type": ["string", "null"]},
            "createdDateTime": when,
            "memberCount": count,
        },
        "required": ["id"],
    }
    components["NotificationOperation"] = {
        "type": "object",
        "description": "A send to many users as a Graph long-running operation.",
        "properties": {
            "id": text,
            "status": {"enum": ["notStarted", "running", "succeeded", "failed"]},
            "createdDateTime": when,
            "lastActionDateTime": when,
            "finishedDateTime": when,
            "audienceId": {"type": ["string", "null"]},
            "totalCount": count,
            "processedCount": count,
            "succeededCount": count,
            "failedCount": count,
            "percentageComplete": count,
            "errors": {
                "type": "array",
                "description": f"Per-recipient failures (the first {ERRORS_SHOWN}).",
                "items": {
                    "type": "object",
                    "properties": {"userId": text, "code": text, "message": text},
                },
            },
        },
    }
    note = {"$ref": "#/components/schemas/NotificationCreate"}
    audience = {"$ref": "#/components/schemas/NotificationAudience"}
    operation = {"$ref": "#/components/schemas/NotificationOperation"}
    members = {"type": "object", "properties": {"userIds": ids}, "required": ["userIds"]}
    key = {"name": "Idempotency-Key", "in": "header", "schema": text}
    accepted = {
        "description": "Accepted: the operation (Location and Operation-Location name it)",
        "content": _content(operation),
    }
    ident = {"name": "id", "in": "path", "required": True, "schema": text}
    base = "/beta/notificationAudiences"
    counted = {"description": "How many", "content": _content({"type": "object"})}
    return {
        "/beta/sendNotification": {
            "post": {
                "summary": "Send one notification to each of these users (app-only token)",
                "parameters": [key],
                "requestBody": {
                    "content": _content(
                        {
                            "type": "object",
                            "properties": {"userIds": ids, "notification": note},
                            "required": ["userIds", "notification"],
                        }
                    )
                },
                "responses": {"202": accepted, "4XX": err},
            }
        },
        base: {
            "post": {
                "summary": "Create an audience (app-only token)",
                "requestBody": {"content": _content(audience)},
                "responses": {
                    "201": {"description": "Created", "content": _content(audience)},
                    "4XX": err,
                },
            },
            "get": {
                "summary": "The app's audiences",
                "responses": {"200": {"description": "value"}},
            },
        },
        f"{base}/{{id}}": {
            "parameters": [ident],
            "get": {
                "summary": "Get one",
                "responses": {
                    "200": {"description": "The audience", "content": _content(audience)},
                    "4XX": err,
                },
            },
            "delete": {
                "summary": "Delete it and its members",
                "responses": {"204": {"description": "Gone"}, "4XX": err},
            },
        },
        f"{base}/{{id}}/addMembers": {
            "parameters": [ident],
            "post": {
                "summary": "Add users (already members are ignored)",
                "requestBody": {"content": _content(members)},
                "responses": {"200": counted, "4XX": err},
            },
        },
        f"{base}/{{id}}/removeMembers": {
            "parameters": [ident],
            "post": {
                "summary": "Remove users (non-members are ignored)",
                "requestBody": {"content": _content(members)},
                "responses": {"200": counted, "4XX": err},
            },
        },
        f"{base}/{{id}}/members": {
            "parameters": [ident],
            "get": {
                "summary": "Members by user id, a page at a time (@odata.nextLink)",
                "parameters": [
                    {"name": n, "in": "query", "schema": text} for n in ("$top", "$skiptoken")
                ],
                "responses": {"200": {"description": "A page"}, "4XX": err},
            },
        },
        f"{base}/{{id}}/sendNotification": {
            "parameters": [ident, key],
            "post": {
                "summary": "Send one notification to each member, as of now (app-only token)",
                "requestBody": {
                    "content": _content(
                        {
                            "type": "object",
                            "properties": {"notification": note},
                            "required": ["notification"],
                        }
                    )
                },
                "responses": {"202": accepted, "4XX": err},
            },
        },
        "/beta/notificationOperations/{id}": {
            "parameters": [ident],
            "get": {
                "summary": "A send's progress",
                "responses": {
                    "200": {"description": "The operation", "content": _content(operation)},
                    "4XX": err,
                },
            },
        },
    }


def _content(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}
