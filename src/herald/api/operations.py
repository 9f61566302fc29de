"""Operational endpoints: health, readiness, metrics, the OpenAPI document and its page."""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route

from herald import __version__, appfeed
from herald.api import audiences, preferences, schemas
from herald.api.subscriptions import SubscriptionOut
from herald.errors import HeraldError
from herald.outbound.webhooks import Envelope

READ_ONLY = ("id", "createdDateTime", "lastModifiedDateTime", "@odata.context", "@odata.etag")


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    try:
        await request.app.state.services.store.ping()
    except HeraldError as exc:
        return JSONResponse({"status": "unavailable", "reason": exc.message}, 503)
    return JSONResponse({"status": "ready"})


async def metrics(request: Request) -> Response:
    body = request.app.state.services.metrics.render()
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document, generated from the msgspec wire types."""
    _, components = msgspec.json.schema_components(
        [schemas.NotificationOut, SubscriptionOut], ref_template="#/components/schemas/{name}"
    )
    for name in READ_ONLY:
        components["NotificationOut"]["properties"][name]["readOnly"] = True
    out = components["NotificationOut"]["properties"]
    # Request bodies are the response's own fields, restricted to what each operation accepts.
    # The notification type is open: other properties are kept (docs/api.md, "Open type").
    components["NotificationCreate"] = _subset(out, schemas.CREATE_FIELDS, required=["payload"])
    components["NotificationUpdate"] = _subset(out, schemas.UPDATE_FIELDS, required=[])
    components["Error"] = _error_schema()
    note = {"$ref": "#/components/schemas/NotificationOut"}
    create = {"$ref": "#/components/schemas/NotificationCreate"}
    update = {"$ref": "#/components/schemas/NotificationUpdate"}
    err = {"description": "Graph error", "content": _json({"$ref": "#/components/schemas/Error"})}
    item = "/beta/users/{user}/notifications/{id}"
    feed = "/beta/users/{user}/notifications"
    user = {"name": "user", "in": "path", "required": True, "schema": {"type": "string"}}
    ident = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
    odata = [
        {"name": n, "in": "query", "schema": {"type": "string"}}
        for n in ("$filter", "$orderby", "$top", "$skip", "$count", "$select")
    ]
    ok = {"description": "The notification", "content": _json(note)}
    minimal = {"description": "Prefer: return=minimal: no body (ETag, Location on create)"}
    prefer = {"name": "Prefer", "in": "header", "schema": {"type": "string"}}
    listing = {
        "type": "object",
        "properties": {"value": {"type": "array", "items": note}, "@odata.nextLink": {}},
    }
    paths: dict[str, dict[str, Any]] = {
        feed: {
            "parameters": [user],
            "post": {
                "summary": "Create, or replace by appNotificationId",
                "parameters": [prefer],
                "requestBody": {"content": _json(create)},
                "responses": {"201": ok, "200": ok, "204": minimal, "4XX": err},
            },
            "get": {
                "summary": "List the calling app's notifications for the user",
                "parameters": odata,
                "responses": {"200": {"description": "A page", "content": _json(listing)}},
            },
        },
        item: {
            "parameters": [user, ident],
            "get": {"summary": "Get one", "responses": {"200": ok, "4XX": err}},
            "patch": {
                "summary": "Update readState/userActionState or content (If-Match honoured)",
                "parameters": [prefer],
                "requestBody": {"content": _json(update)},
                "responses": {"200": ok, "204": minimal, "4XX": err},
            },
            "delete": {"summary": "Delete", "responses": {"204": {"description": "Deleted"}}},
        },
        f"{feed}/$count": {"parameters": [user], "get": {"summary": "Count", "responses": {}}},
        "/beta/$batch": {"post": {"summary": "JSON batching (up to 20 requests)", "responses": {}}},
        "/beta/users/{user}/activities": {
            "parameters": [user],
            "post": {
                "summary": "The seed page's URL: an alias of create (POST …/notifications)",
                "requestBody": {"content": _json(create)},
                "responses": {"201": ok, "200": ok, "204": minimal, "4XX": err},
            },
        },
        "/beta/$metadata": {
            "get": {
                "summary": "The OData CSDL document (XML); no token needed",
                "security": [],
                "responses": {"200": {"description": "application/xml"}},
            }
        },
    }
    for path in list(paths):
        if path.startswith("/beta/users/{user}"):
            me = path.replace("/users/{user}", "/me")
            paths[me] = {k: v for k, v in paths[path].items() if k != "parameters"}
            rest = [p for p in paths[path].get("parameters", []) if p is not user]
            if rest:
                paths[me]["parameters"] = rest
    paths.update(_device_paths(err, ident))
    paths.update(preferences.openapi_paths(err))
    components["NotificationPreferences"] = preferences.SCHEMA
    paths.update(_app_feed_paths(err, ident, components))
    paths.update(audiences.openapi(err, components))
    return {
        "openapi": "3.1.0",
        "info": {"title": "Herald", "version": __version__},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }


def _device_paths(err: dict[str, Any], ident: dict[str, Any]) -> dict[str, Any]:
    """Subscriptions, delta and the live stream (docs/devices.md has the details)."""
    sub = {"$ref": "#/components/schemas/SubscriptionOut"}
    body = {"content": _json({"type": "object"})}
    ok = {"description": "The subscription", "content": _json(sub)}
    subs = "/beta/me/notificationSubscriptions"
    return {
        subs: {
            "post": {
                "summary": "Register a device (the id is the UNS ID)",
                "requestBody": body,
                "responses": {"201": ok, "200": ok, "4XX": err},
            },
            "get": {"summary": "The calling app's subscriptions of the user", "responses": {}},
        },
        f"{subs}/{{id}}": {
            "parameters": [ident],
            "get": {"summary": "Get one", "responses": {"200": ok, "4XX": err}},
            "patch": {
                "summary": "Renew (expirationDateTime), rename, rotate the push channel",
                "requestBody": body,
                "responses": {"200": ok, "4XX": err},
            },
            "delete": {"summary": "Unsubscribe", "responses": {"204": {"description": "Gone"}}},
        },
        f"{subs}/{{id}}/stream": {
            "parameters": [ident],
            "get": {
                "summary": "Live stream: WebSocket upgrade, otherwise Server-Sent Events",
                "parameters": [
                    {"name": n, "in": "query", "schema": {"type": "string"}}
                    for n in ("after", "access_token")
                ],
                "responses": {"200": {"description": "text/event-stream"}, "4XX": err},
            },
        },
        "/beta/webPushKey": {
            "get": {
                "summary": "The calling app's VAPID public key (applicationServerKey)",
                "responses": {
                    "200": {
                        "description": "application and applicationServerKey (base64url)",
                        "content": _json({"type": "object"}),
                    },
                    "4XX": err,
                },
            },
        },
        **{
            f"/beta/me/notifications/{name}": {
                "get": {
                    "summary": "Graph delta query (@odata.deltaLink, @removed)",
                    "parameters": [
                        {"name": n, "in": "query", "schema": {"type": "string"}}
                        for n in ("$deltatoken", "$skiptoken", "$select")
                    ],
                    "responses": {"200": {"description": "A page of changes"}, "410": err},
                },
            }
            for name in ("delta", "delta()", "microsoft.graph.delta()")
        },
    }


def _app_feed_paths(
    err: dict[str, Any], ident: dict[str, Any], components: dict[str, Any]
) -> dict[str, Any]:
    """The app-wide change feed and webhooks (docs/api.md, "Change feed for app servers")."""
    _, found = msgspec.json.schema_components(
        [appfeed.ChangeEvent, Envelope], ref_template="#/components/schemas/{name}"
    )
    components.update(found)
    text, stamp = {"type": "string"}, {"type": "string", "format": "date-time"}
    kinds = {"type": "array", "items": {"enum": list(appfeed.KINDS)}}
    webhook_in = {
        "type": "object",
        "properties": {
            "url": text,
            "secret": {**text, "description": "whsec_ + base64 of 24-64 bytes; write-only"},
            "changeTypes": kinds,
            "status": {"enum": ["active", "disabled"]},
        },
        "additionalProperties": False,
    }
    components["WebhookCreate"] = {**webhook_in, "required": ["url"]}
    components["WebhookUpdate"] = webhook_in
    components["Webhook"] = {
        "type": "object",
        "properties": {
            "id": text,
            "url": text,
            "secret": {**text, "description": "only in the answer to the POST that set it"},
            "changeTypes": kinds,
            "status": {"enum": ["active", "disabled", "failed"]},
            "createdDateTime": stamp,
            "lastModifiedDateTime": stamp,
            "delivery": {
                "type": "object",
                "description": "Delivery state (GET and PATCH answers)",
                "properties": {
                    "cursor": text,
                    "consecutiveFailures": {"type": "integer"},
                    "failingSinceDateTime": stamp,
                    "lastAttemptDateTime": stamp,
                    "lastSuccessDateTime": stamp,
                    "lastStatusCode": {"type": ["integer", "null"]},
                    "lastError": {"type": ["string", "null"]},
                    "nextAttemptDateTime": stamp,
                    "oldestPendingChangeDateTime": stamp,
                    "lagSeconds": {"type": "number"},
                },
            },
        },
    }
    hook = {"$ref": "#/components/schemas/Webhook"}
    ok = {"description": "The webhook", "content": _json(hook)}
    page = {
        "type": "object",
        "properties": {
            "value": {"type": "array", "items": {"$ref": "#/components/schemas/ChangeEvent"}},
            "@odata.nextLink": text,
            "@odata.deltaLink": text,
        },
    }
    hooks = "/beta/notificationWebhooks"
    return {
        "/beta/notificationChanges": {
            "get": {
                "summary": "The app's change feed, all users (app-only token), from a cursor",
                "parameters": [
                    {"name": n, "in": "query", "schema": text}
                    for n in ("$deltatoken", "$skiptoken")
                ],
                "responses": {
                    "200": {"description": "A page of changes", "content": _json(page)},
                    "410": err,
                    "4XX": err,
                },
            }
        },
        hooks: {
            "post": {
                "summary": "Register a webhook (app-only token); the answer has the secret",
                "requestBody": {"content": _json({"$ref": "#/components/schemas/WebhookCreate"})},
                "responses": {"201": ok, "4XX": err},
            },
            "get": {"summary": "The app's webhooks, with their delivery state", "responses": {}},
        },
        f"{hooks}/{{id}}": {
            "parameters": [ident],
            "get": {"summary": "One webhook and its delivery state", "responses": {"200": ok}},
            "patch": {
                "summary": "Change url, secret, changeTypes; disable, or re-enable a failed one",
                "requestBody": {"content": _json({"$ref": "#/components/schemas/WebhookUpdate"})},
                "responses": {"200": ok, "4XX": err},
            },
            "delete": {"summary": "Remove", "responses": {"204": {"description": "Removed"}}},
        },
    }


def _subset(
    properties: dict[str, Any], names: tuple[str, ...], required: list[str]
) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {name: properties[name] for name in names},
        "required": required,
        "additionalProperties": True,
        "description": "Open type: another property (an OData identifier, not a declared name "
        "in another case) is kept and echoed; instance annotations (@odata.*) are ignored.",
    }


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _error_schema() -> dict[str, Any]:
    text = {"type": "string"}
    inner = {"type": "object", "properties": {"request-id": text, "date": text}}
    detail = {
        "type": "object",
        "properties": {"code": text, "message": text, "target": text, "innerError": inner},
        "required": ["code", "message"],
    }
    return {"type": "object", "properties": {"error": detail}, "required": ["error"]}


async def openapi(request: Request) -> Response:
    return JSONResponse(openapi_document())


DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Herald API</title>
<style>body{font:15px system-ui;margin:2rem;max-width:60rem}code{background:#eee;padding:0 .2em}
h2{font-size:1.1rem;margin-top:1.5rem}pre{background:#f6f6f6;padding:.5rem;overflow:auto}</style>
</head><body><h1>Herald API</h1><p>Generated from <a href="/openapi.json">/openapi.json</a>.</p>
<main id="ops">Loading…</main>
<script>
fetch('/openapi.json').then(r => r.json()).then(doc => {
  const main = document.getElementById('ops'); main.textContent = '';
  for (const [path, item] of Object.entries(doc.paths)) {
    for (const [method, op] of Object.entries(item)) {
      if (method === 'parameters') continue;
      const h = document.createElement('h2');
      h.textContent = method.toUpperCase() + ' ' + path; main.appendChild(h);
      const p = document.createElement('p'); p.textContent = op.summary || ''; main.appendChild(p);
    }
  }
  const h = document.createElement('h2'); h.textContent = 'Schemas'; main.appendChild(h);
  const pre = document.createElement('pre');
  pre.textContent = JSON.stringify(doc.components.schemas, null, 2); main.appendChild(pre);
});
</script></body></html>"""


async def docs(request: Request) -> Response:
    return HTMLResponse(DOCS_PAGE)


def routes() -> list[BaseRoute]:
    return [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics),
        Route("/openapi.json", openapi),
        Route("/docs", docs),
    ]
