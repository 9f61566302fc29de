"""`/beta/notificationWebhooks`: an app's webhooks (docs/api.md "Change feed"), with an app-only
token. The secret is write-only: returned once, in the answer to the POST that set or generated
it. GET shows each webhook's delivery state."""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import urlsplit

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from herald import appfeed
from herald.api import wire
from herald.api.appcaller import app_caller
from herald.api.requests import json_response, read_body, services, version
from herald.errors import InvalidRequest, NotFound
from herald.model import App
from herald.outbound.webhooks import check_secret, describe, new_secret
from herald.store import Webhook

PATH = "/notificationWebhooks"
STATUSES = ("active", "disabled")
MAX_URL = 2048


class WebhookIn(msgspec.Struct, forbid_unknown_fields=True):
    """Lenient on types (each field is checked below, with a message naming it)."""

    url: Any = None
    secret: Any = None
    changeTypes: Any = None
    status: Any = None


_DECODER = msgspec.json.Decoder(WebhookIn)


def _out(request: Request, hook: Webhook, secret: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": hook.id,
        "url": hook.url,
        "changeTypes": list(hook.kinds),
        "status": hook.status,
        "createdDateTime": hook.created,
        "lastModifiedDateTime": hook.last_modified,
    }
    if secret:
        body["secret"] = hook.secret
    return body


async def _with_state(request: Request, hook: Webhook) -> dict[str, Any]:
    s = services(request)
    page = await s.changefeed.app_changes(hook.app, hook.cursor, 1)
    oldest = page.entries[0][1].at if page.entries else None
    body = _out(request, hook)
    body["delivery"] = describe(hook, s.feed.clock(), oldest)
    return body


def _context(request: Request, suffix: str = "") -> str:
    base = services(request).settings.base_url
    return f"{base}/{version(request)}/$metadata#notificationWebhooks{suffix}"


async def _url(request: Request, value: Any) -> str:
    s = services(request)
    if not isinstance(value, str) or not value or len(value) > MAX_URL:
        raise InvalidRequest(f"'url' must be a URL of at most {MAX_URL} characters.", target="url")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError as exc:
        raise InvalidRequest("'url' is not a valid URL.", target="url") from exc
    schemes = ("https", "http") if s.settings.webhook_allow_private_endpoints else ("https",)
    if parts.scheme not in schemes or not parts.hostname:
        raise InvalidRequest("'url' must be an https:// URL.", target="url")
    if parts.username is not None or parts.password is not None or parts.fragment:
        raise InvalidRequest(
            "'url' may have neither user information nor a fragment.", target="url"
        )
    if not await s.webhooks.guard.allowed(value):
        raise InvalidRequest(
            "'url' is, or resolves to, a loopback, private or link-local address: Herald posts"
            " only to public addresses.",
            target="url",
        )
    return value


def _kinds(value: Any) -> tuple[str, ...]:
    if (
        not isinstance(value, list)
        or not value
        or any(k not in appfeed.KINDS for k in value)
        or len(set(value)) != len(value)
    ):
        raise InvalidRequest(
            f"'changeTypes' must be a non-empty list of distinct values of {list(appfeed.KINDS)}.",
            target="changeTypes",
        )
    return tuple(k for k in appfeed.KINDS if k in value)


def _status(value: Any) -> str:
    if value not in STATUSES:
        raise InvalidRequest(f"'status' must be one of {list(STATUSES)}.", target="status")
    return str(value)


def _secret(value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidRequest("'secret' must be a string.", target="secret")
    return check_secret(value)


async def create(request: Request) -> Response:
    app = await app_caller(request)
    s = services(request)
    data: WebhookIn = wire.decode_body(await read_body(request), _DECODER)
    if data.url is None:
        raise InvalidRequest("'url' is required.", target="url")
    url = await _url(request, data.url)
    now = s.feed.clock()
    hook = Webhook(
        id=str(uuid.uuid4()),
        app=app.host_name,
        url=url,
        secret=new_secret() if data.secret is None else _secret(data.secret),
        kinds=appfeed.KINDS if data.changeTypes is None else _kinds(data.changeTypes),
        status="active" if data.status is None else _status(data.status),
        cursor=0,
        created=now,
        last_modified=now,
    )
    stored = await s.hooks.add_webhook(hook, s.settings.max_webhooks)
    s.webhooks.wake.set()
    body = {"@odata.context": _context(request, "/$entity"), **_out(request, stored, secret=True)}
    location = f"{s.settings.base_url}/{version(request)}{PATH}/{stored.id}"
    return json_response(wire.encode(body), 201, headers={"Location": location})


async def _own(request: Request, app: App) -> Webhook:
    id = request.path_params["id"]
    hook = await services(request).hooks.get_webhook(app.host_name, id)
    if hook is None:
        raise NotFound(f"Webhook '{id[:64]}' does not exist.")
    return hook


async def get(request: Request) -> Response:
    app = await app_caller(request)
    hook = await _own(request, app)
    body = {"@odata.context": _context(request, "/$entity"), **await _with_state(request, hook)}
    return json_response(wire.encode(body))


async def list_all(request: Request) -> Response:
    app = await app_caller(request)
    hooks = await services(request).hooks.list_webhooks(app.host_name)
    items = [await _with_state(request, h) for h in hooks]
    return json_response(wire.encode({"@odata.context": _context(request), "value": items}))


async def update(request: Request) -> Response:
    app = await app_caller(request)
    s = services(request)
    data: WebhookIn = wire.decode_body(await read_body(request), _DECODER)
    hook = await _own(request, app)
    changes: dict[str, Any] = {"last_modified": s.feed.clock()}
    if data.url is not None:
        changes["url"] = await _url(request, data.url)
    if data.secret is not None:
        changes["secret"] = _secret(data.secret)
    if data.changeTypes is not None:
        changes["kinds"] = _kinds(data.changeTypes)
    if data.status is not None:
        changes["status"] = _status(data.status)
        if changes["status"] == "active" and hook.status != "active":
            # Re-enabled: start afresh from the cursor (the give-up clock restarts).
            changes |= {"failures": 0, "failing_since": None, "next_attempt": None}
    stored = await s.hooks.update_webhook(msgspec.structs.replace(hook, **changes))
    s.webhooks.wake.set()
    body = {"@odata.context": _context(request, "/$entity"), **await _with_state(request, stored)}
    return json_response(wire.encode(body))


async def delete(request: Request) -> Response:
    app = await app_caller(request)
    if not await services(request).hooks.delete_webhook(app.host_name, request.path_params["id"]):
        raise NotFound(f"Webhook '{request.path_params['id'][:64]}' does not exist.")
    return Response(status_code=204)


def routes() -> list[BaseRoute]:
    return [
        Route(PATH, list_all, methods=["GET"]),
        Route(PATH, create, methods=["POST"]),
        Route(PATH + "/{id}", get, methods=["GET"]),
        Route(PATH + "/{id}", update, methods=["PATCH"]),
        Route(PATH + "/{id}", delete, methods=["DELETE"]),
    ]
