"""The web inbox (docs/inbox.md): Herald serves its browser client's files under `/inbox/`.

The files are static and few, so they are read once and kept in memory with their ETags; every
answer carries a strict Content-Security-Policy (scripts and connections to this origin only, plus
the sign-in IdP when one is configured) and `Referrer-Policy: no-referrer`, because the page's
URL can carry a sign-in code in its fragment and its stream URLs carry access tokens.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from herald.errors import NotFound
from herald.settings import Settings

PATH = "/inbox/"
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".json": "application/json",
}


@dataclass(frozen=True)
class Asset:
    body: bytes
    gzipped: bytes  # gzip -9, once at start: the files shrink to about 30 %
    media_type: str
    etag: str


def _asset(body: bytes, name: str) -> Asset:
    suffix = name[name.rfind(".") :]
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    return Asset(body, gzip.compress(body, 9, mtime=0), _TYPES[suffix], etag)


def sign_in(settings: Settings) -> dict[str, str]:
    """How the page signs people in: the configured IdP, else the embedded issuer's links."""
    if settings.inbox_issuer:
        return {
            "signIn": "oidc",
            "issuer": settings.inbox_issuer,
            "clientId": settings.inbox_client_id,
            "scope": settings.inbox_scope,
        }
    return {"signIn": "link" if settings.local_issuer else "none"}


def policy(settings: Settings) -> str:
    """The Content-Security-Policy of every inbox answer: the page talks to this origin, and to
    the sign-in IdP (its issuer's origin, plus `inbox_origins` for a token endpoint elsewhere)."""
    connect = ["'self'"]
    if settings.inbox_issuer:
        parts = urlsplit(settings.inbox_issuer)
        connect.append(f"{parts.scheme}://{parts.netloc}")
        connect += settings.inbox_origins.split()
    return (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        f"connect-src {' '.join(connect)}; worker-src 'self'; manifest-src 'self'; "
        "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    )


class Inbox:
    """Serves `src/herald/web/` and the generated `config.json`."""

    def __init__(self, settings: Settings) -> None:
        files = resources.files("herald") / "web"
        self.assets = {
            f.name: _asset(f.read_bytes(), f.name)
            for f in files.iterdir()
            if f.is_file() and f.name[f.name.rfind(".") :] in _TYPES
        }
        config = json.dumps(sign_in(settings)).encode()
        self.assets["config.json"] = _asset(config, "config.json")
        self.headers = {
            "Content-Security-Policy": policy(settings),
            "Referrer-Policy": "no-referrer",
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": "no-cache",
        }

    async def serve(self, request: Request) -> Response:
        name = request.path_params.get("name") or "index.html"
        asset = self.assets.get(name)
        if asset is None:
            raise NotFound(f"There is no inbox file '{name}'.")
        headers = {**self.headers, "ETag": asset.etag, "Vary": "Accept-Encoding"}
        if asset.etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=headers)
        if "gzip" in request.headers.get("accept-encoding", ""):
            headers["Content-Encoding"] = "gzip"
            return Response(asset.gzipped, media_type=asset.media_type, headers=headers)
        return Response(asset.body, media_type=asset.media_type, headers=headers)


def routes(settings: Settings) -> list[BaseRoute]:
    inbox = Inbox(settings)

    async def redirect(request: Request) -> Response:
        return RedirectResponse(PATH + ("?" + request.url.query if request.url.query else ""))

    return [
        Route("/inbox", redirect, methods=["GET"]),
        Route(PATH, inbox.serve, methods=["GET", "HEAD"]),
        Route(PATH + "{name}", inbox.serve, methods=["GET", "HEAD"]),
    ]
