"""CORS: web apps on other origins call the API, its streams and load `herald.js` from the browser
(docs/configuration.md `cors_origins`). Real HTTP against a running Herald."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.conftest import RegisteredApp, Server, servers

ORIGIN = "https://app.example.org"


def preflight(
    base: str, path: str, method: str, headers: str, origin: str = ORIGIN
) -> httpx.Response:
    return httpx.options(
        base + path,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": headers,
        },
    )


def test_any_origin_may_call_the_api_by_default(
    server: Server, app: RegisteredApp, user: str
) -> None:
    answer = preflight(
        server.base_url, "/beta/me/notifications", "POST", "authorization,content-type,x-uns-id"
    )
    assert answer.status_code == 200
    assert answer.headers["access-control-allow-origin"] == "*"
    assert "POST" in answer.headers["access-control-allow-methods"]
    allowed = answer.headers["access-control-allow-headers"].lower()
    assert {"authorization", "content-type", "x-uns-id"} <= set(allowed.replace(" ", "").split(","))

    # The hot path (ingest) answers with the CORS headers too, and exposes what clients read.
    token = server.token(app, user)
    body = {"targetHostName": app.host_name, "payload": {"visualContent": {"title": "t"}}}
    created = httpx.post(
        server.base_url + "/beta/me/notifications",
        json=body,
        headers={"Authorization": f"Bearer {token}", "Origin": ORIGIN},
    )
    assert created.status_code == 201, created.text
    assert created.headers["access-control-allow-origin"] == "*"
    exposed = created.headers["access-control-expose-headers"].lower()
    assert {"location", "etag", "request-id", "retry-after"} <= set(
        exposed.replace(" ", "").split(",")
    )
    library = httpx.get(server.base_url + "/inbox/herald.js", headers={"Origin": ORIGIN})
    assert library.headers["access-control-allow-origin"] == "*"
    token_endpoint = preflight(server.base_url, "/oauth2/v2.0/token", "POST", "content-type")
    assert token_endpoint.headers["access-control-allow-origin"] == "*"

    # Operational endpoints are for the operator's tools, not for web pages of other origins.
    for path in ("/metrics", "/readyz", "/healthz", "/openapi.json", "/inbox/"):
        answer = httpx.get(server.base_url + path, headers={"Origin": ORIGIN})
        assert "access-control-allow-origin" not in answer.headers, path


def test_origins_can_be_limited_or_turned_off(tmp_path: Path) -> None:
    (tmp_path / "one").mkdir()
    for server in servers("sqlite", tmp_path / "one", cors_origins=f"{ORIGIN}, https://b.example"):
        ok = preflight(server.base_url, "/beta/me/notifications", "GET", "authorization")
        assert ok.headers["access-control-allow-origin"] == ORIGIN
        refused = preflight(
            server.base_url,
            "/beta/me/notifications",
            "GET",
            "authorization",
            "https://evil.example",
        )
        assert refused.status_code == 400
        assert "access-control-allow-origin" not in refused.headers
    (tmp_path / "off").mkdir()
    for server in servers("sqlite", tmp_path / "off", cors_origins=""):
        answer = preflight(server.base_url, "/beta/me/notifications", "GET", "authorization")
        assert "access-control-allow-origin" not in answer.headers
        plain = httpx.get(server.base_url + "/healthz", headers={"Origin": ORIGIN})
        assert "access-control-allow-origin" not in plain.headers
