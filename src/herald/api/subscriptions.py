"""`/me/notificationSubscriptions`: one subscription per app client per device (its id is the
UNS ID). Only a delegated token manages them: a device acts for its signed-in user."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from herald import fields
from herald.access import Caller
from herald.api import schemas, wire
from herald.api.requests import json_response, read_body, services, version
from herald.errors import AccessDenied, InvalidRequest, NotFound
from herald.limits import Limits
from herald.model import DeliveryState, DevicePlatform, PushChannel, Subscription
from herald.outbound.providers import PROVIDERS, webpush
from herald.outbound.providers.table import FIELD
from herald.settings import Settings

MAX_DISPLAY_NAME = 256
PLATFORMS: dict[str, DevicePlatform] = {p.value.lower(): p for p in DevicePlatform}
READ_ONLY = ("id", "createdDateTime", "lastModifiedDateTime", "deliveryState")


class SubscriptionIn(msgspec.Struct, forbid_unknown_fields=True):
    """Lenient on types (each field is checked below, with a message naming it)."""

    application: Any = None
    platform: Any = None
    # UNSET (absent) differs from null here: a PATCH with null clears the field.
    displayName: Any = msgspec.UNSET
    pushChannel: Any = msgspec.UNSET
    expirationDateTime: Any = None
    id: Any = None
    createdDateTime: Any = None
    lastModifiedDateTime: Any = None
    deliveryState: Any = None
    odata_type: Any = msgspec.field(default=None, name="@odata.type")


_DECODER = msgspec.json.Decoder(SubscriptionIn)


class SubscriptionOut(msgspec.Struct, rename="camel"):
    odata_context: str = msgspec.field(name="@odata.context")
    id: str
    application: str
    platform: DevicePlatform
    display_name: str | None
    push_channel: dict[str, Any] | None
    expiration_date_time: datetime
    created_date_time: datetime
    last_modified_date_time: datetime
    delivery_state: DeliveryState


# -- input -------------------------------------------------------------------------------------


def push_channel(value: Any, platform: DevicePlatform, settings: Settings) -> PushChannel | None:
    """The push channel of a subscription of `platform`, checked by the provider that reaches
    it (for shape, not for reachability)."""
    if value is None:
        return None
    provider = PROVIDERS.reaching(platform)
    if provider is None:
        raise InvalidRequest("A 'live' subscription has no pushChannel.", target=FIELD)
    return provider.parse(value, settings)


def _channel_out(channel: PushChannel | None) -> dict[str, Any] | None:
    if channel is None:
        return None
    data: dict[str, Any] = msgspec.to_builtins(channel)
    data.pop("type", None)
    return data


def _expiration(value: Any, now: datetime, request: Request) -> datetime | None:
    s = services(request).settings
    limits = Limits(0, s.subscription_ttl, s.max_subscription_ttl, clamp_ttl=False)
    return schemas.expiration(value, now, limits, "expirationDateTime")


def _given(value: Any) -> Any:
    return None if value is msgspec.UNSET else value


def _decode(body: bytes) -> SubscriptionIn:
    data: SubscriptionIn = wire.decode_body(body, _DECODER)
    for name in READ_ONLY:
        if getattr(data, name) is not None:
            raise InvalidRequest(f"'{name}' is read-only.", target=name)
    return data


def _application(value: Any, c: Caller) -> None:
    host = fields.string(value, "application", 253, required=True)
    if host is None or host.lower() != c.app.host_name.lower():
        raise AccessDenied(
            f"'application' must be the calling app's host name ({c.app.host_name})."
        )


# -- endpoints ---------------------------------------------------------------------------------


async def _caller(request: Request) -> Caller:
    c = await services(request).access.caller(request.headers.get("authorization"), None)
    if c.principal.user_id is None:
        raise InvalidRequest(
            "Subscriptions belong to a device's signed-in user: use a delegated token.",
            target="Authorization",
        )
    return c


def _context(request: Request, suffix: str) -> str:
    base = services(request).settings.base_url
    return f"{base}/{version(request)}/$metadata#me/notificationSubscriptions{suffix}"


def _out(request: Request, sub: Subscription) -> SubscriptionOut:
    return SubscriptionOut(
        odata_context=_context(request, "/$entity"),
        id=sub.id,
        application=sub.app,
        platform=sub.platform,
        display_name=sub.display_name,
        push_channel=_channel_out(sub.push_channel),
        expiration_date_time=sub.expiration_date_time,
        created_date_time=sub.created_date_time,
        last_modified_date_time=sub.last_modified_date_time,
        delivery_state=sub.delivery,
    )


def _path_id(request: Request) -> str:
    value: str = request.path_params["id"]
    if len(value) > 64 or not value.isprintable():
        raise NotFound(f"Subscription {value[:64]!r} was not found.")
    return value


async def _own(request: Request, c: Caller) -> Subscription:
    s = services(request)
    sub = await s.subscriptions.get_subscription(_path_id(request), s.feed.clock())
    if sub is None or sub.user_id != c.user_id or sub.app != c.app.host_name:
        raise NotFound(f"Subscription '{_path_id(request)}' was not found.")
    return sub


async def _holder(request: Request, sub: Subscription) -> Subscription | None:
    """Who holds this push channel now: the store releases it from them (see `Store`)."""
    if sub.push_channel is None:
        return None
    return await services(request).subscriptions.channel_holder(sub.app, sub.push_channel.key)


async def _release(request: Request, holder: Subscription | None, stored: Subscription) -> None:
    """Close the live streams of a subscription that lost its push channel (and so was
    deleted): on a shared browser, the previous person's stream must stop too."""
    if holder is not None and holder.id != stored.id:
        await services(request).broker.revoke(holder.user_id, holder.app, holder.id)


async def create(request: Request) -> Response:
    c = await _caller(request)
    s = services(request)
    data = _decode(await read_body(request))
    _application(data.application, c)
    if data.platform is None:
        raise InvalidRequest("'platform' is required.", target="platform")
    platform: DevicePlatform = wire.choice(data.platform, "platform", PLATFORMS)
    now = s.feed.clock()
    expires = _expiration(data.expirationDateTime, now, request)
    sub = Subscription(
        id=str(uuid.uuid4()),
        user_id=c.user_id,
        app=c.app.host_name,
        platform=platform,
        display_name=fields.string(_given(data.displayName), "displayName", MAX_DISPLAY_NAME),
        push_channel=push_channel(_given(data.pushChannel), platform, s.settings),
        expiration_date_time=expires or now + timedelta(seconds=s.settings.subscription_ttl),
        created_date_time=now,
        last_modified_date_time=now,
    )
    holder = await _holder(request, sub)
    stored, created = await s.subscriptions.add_subscription(sub, s.settings.max_subscriptions, now)
    await _release(request, holder, stored)
    body = wire.encode(_out(request, stored))
    if not created:
        return json_response(body)
    base = s.settings.base_url
    location = f"{base}/{version(request)}/me/notificationSubscriptions/{stored.id}"
    return json_response(body, 201, {"Location": location})


async def list_all(request: Request) -> Response:
    c = await _caller(request)
    s = services(request)
    if request.query_params:
        name = next(iter(request.query_params))
        raise InvalidRequest(
            f"Query option '{name[:64]}' is not supported on subscriptions.", target=name[:64]
        )
    subs = await s.subscriptions.list_subscriptions(c.user_id, c.app.host_name, s.feed.clock())
    items = [msgspec.to_builtins(_out(request, sub)) for sub in subs]
    for item in items:
        del item["@odata.context"]
    return json_response(wire.encode({"@odata.context": _context(request, ""), "value": items}))


async def get_one(request: Request) -> Response:
    c = await _caller(request)
    return json_response(wire.encode(_out(request, await _own(request, c))))


async def patch_one(request: Request) -> Response:
    c = await _caller(request)
    s = services(request)
    data = _decode(await read_body(request))
    sub = await _own(request, c)
    if data.application is not None or data.platform is not None:
        target = "application" if data.application is not None else "platform"
        raise InvalidRequest(
            f"'{target}' cannot be changed; create a new subscription.", target=target
        )
    changes: dict[str, Any] = {}
    now = s.feed.clock()
    if data.expirationDateTime is not None:
        changes["expiration_date_time"] = _expiration(data.expirationDateTime, now, request)
    if data.displayName is not msgspec.UNSET:
        changes["display_name"] = fields.string(data.displayName, "displayName", MAX_DISPLAY_NAME)
    if data.pushChannel is not msgspec.UNSET:  # null: the device goes live-only
        changes["push_channel"] = push_channel(data.pushChannel, sub.platform, s.settings)
    if not changes:
        raise InvalidRequest("The PATCH body changes nothing.", target="body")
    updated = msgspec.structs.replace(sub, last_modified_date_time=now, **changes)
    holder = await _holder(request, updated)
    stored = await s.subscriptions.update_subscription(updated, now)
    await _release(request, holder, stored)
    return json_response(wire.encode(_out(request, stored)))


async def delete_one(request: Request) -> Response:
    c = await _caller(request)
    s = services(request)
    sub_id = _path_id(request)
    await s.subscriptions.delete_subscription(c.user_id, c.app.host_name, sub_id)
    await s.broker.revoke(c.user_id, c.app.host_name, sub_id)
    return Response(status_code=204)


async def web_push_key(request: Request) -> Response:
    """The calling app's VAPID public key: a browser's `applicationServerKey` (docs/push.md).
    Any token of the app will do; the key is generated on first use."""
    s = services(request)
    principal = await s.access.principal(request.headers.get("authorization"))
    app = await s.access.apps.get(principal.client_id)
    if app is None:
        raise AccessDenied(f"The app '{principal.client_id}' is not registered with Herald.")
    await s.access.limits.check(app.host_name, principal.user_id or principal.client_id)
    pem = await s.keyring.ensure(app.host_name, webpush.KIND, webpush.generate_key)
    body = {"application": app.host_name, "applicationServerKey": webpush.public_key(pem)}
    return json_response(wire.encode(body))


def routes() -> list[BaseRoute]:
    base = "/me/notificationSubscriptions"
    return [
        Route("/webPushKey", web_push_key, methods=["GET"]),
        Route(base, create, methods=["POST"]),
        Route(base, list_all, methods=["GET"]),
        Route(f"{base}/{{id}}", get_one, methods=["GET"]),
        Route(f"{base}/{{id}}", patch_one, methods=["PATCH"]),
        Route(f"{base}/{{id}}", delete_one, methods=["DELETE"]),
    ]
