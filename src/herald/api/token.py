"""The embedded issuer over HTTP: client-credentials token endpoint, OIDC discovery and JWKS.

* `POST /oauth2/v2.0/token` (alias `/oauth2/token`): RFC 6749 §4.4 client credentials. The client
  authenticates with HTTP Basic (`client_secret_basic`) or form fields (`client_secret_post`), not
  both (§2.3). Also the web inbox's session grants (docs/inbox.md): a sign-in code, then refresh
  tokens (§6). Errors use the OAuth shape of §5.2, not the Graph one, because OAuth clients
  (MSAL, azure-identity, oauthlib...) parse that shape.
* `GET /.well-known/openid-configuration` and `GET /discovery/v2.0/keys`: so that another Herald,
  or any JWT library, can trust this Herald as an issuer (the paths mirror Entra ID's).
"""

from __future__ import annotations

import base64
import binascii
import functools
import logging
import math
from typing import Any
from urllib.parse import parse_qs, unquote_plus

import msgspec
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from herald.auth.credentials import hash_secret, verify_secret
from herald.auth.issuer import ALGORITHM, SCOPE, LocalIssuer
from herald.auth.sessions import SIGNIN_GRANT, InvalidGrant, Sessions
from herald.errors import NotFound

log = logging.getLogger(__name__)

TOKEN_PATH = "/oauth2/v2.0/token"
KEYS_PATH = "/discovery/v2.0/keys"
DISCOVERY_PATH = "/.well-known/openid-configuration"
_MAX_FORM_BYTES = 16 * 1024
_FORM_TYPE = "application/x-www-form-urlencoded"
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


class OAuthError(Exception):
    """An RFC 6749 §5.2 error response."""

    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.status = status


def routes() -> list[BaseRoute]:
    return [
        Route(TOKEN_PATH, token_endpoint, methods=["POST"]),
        Route("/oauth2/token", token_endpoint, methods=["POST"]),
        Route(DISCOVERY_PATH, openid_configuration, methods=["GET"]),
        Route(KEYS_PATH, keys, methods=["GET"]),
    ]


async def token_endpoint(request: Request) -> Response:
    # Each attempt costs a deliberately slow scrypt check: limit attempts per client address so
    # the endpoint cannot be used to burn CPU or to guess secrets quickly.
    address = request.client.host if request.client else "unknown"
    wait = request.app.state.services.token_limiter.wait_time(address)
    if wait:
        retry = str(max(1, math.ceil(wait)))
        error = OAuthError("slow_down", "Too many token requests; retry later.", 429)
        response = _oauth_error(error)
        response.headers["Retry-After"] = retry
        return response
    try:
        return await _issue(request)
    except OAuthError as exc:
        return _oauth_error(exc)


async def openid_configuration(request: Request) -> Response:
    issuer = _issuer(request)
    if issuer is None:
        raise NotFound("This Herald has no embedded issuer.")
    base = _endpoint_base(request, issuer)
    doc = {
        "issuer": issuer.issuer,
        "token_endpoint": base + TOKEN_PATH,
        "jwks_uri": base + KEYS_PATH,
        "grant_types_supported": ["client_credentials", "refresh_token", SIGNIN_GRANT],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "response_types_supported": ["token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": [ALGORITHM],
        "scopes_supported": [SCOPE],
        "claims_supported": ["iss", "aud", "exp", "nbf", "iat", "jti", "sub", "oid", "azp"]
        + ["appid", "scp", "roles", "idtyp"],
    }
    return _json(doc, headers={"Cache-Control": "public, max-age=3600"})


async def keys(request: Request) -> Response:
    issuer = _issuer(request)
    if issuer is None:
        raise NotFound("This Herald has no embedded issuer.")
    # Short max-age: verifiers that honour it pick up a new key soon after a rotation.
    return _json(issuer.jwks(), headers={"Cache-Control": "public, max-age=300"})


# --- client credentials ----------------------------------------------------------------------


async def _issue(request: Request) -> Response:
    issuer = _issuer(request)
    if issuer is None:
        raise OAuthError("invalid_request", "This Herald has no embedded issuer.", 404)
    form = await _read_form(request)
    grant_type = form.get("grant_type")
    if not grant_type:
        raise OAuthError("invalid_request", "grant_type is required.")
    if grant_type == "client_credentials":
        return await _client_credentials_grant(request, issuer, form)
    if grant_type in (SIGNIN_GRANT, "refresh_token"):
        return await _session_grant(request, issuer, form, grant_type)
    raise OAuthError(
        "unsupported_grant_type",
        f"Supported grant types: client_credentials, refresh_token and {SIGNIN_GRANT}; "
        f"not {grant_type!r}.",
    )


async def _client_credentials_grant(
    request: Request, issuer: LocalIssuer, form: dict[str, str]
) -> Response:
    client_id, secret = _client_credentials(request, form)
    await _authenticate(request, client_id, secret)
    _check_scope(form.get("scope"), issuer.audience)
    ttl = int(request.app.state.services.settings.token_ttl)
    token = issuer.mint(client_id=client_id, user_id=None, ttl_seconds=ttl, roles=(SCOPE,))
    log.info("issued an app-only token to client %s", client_id)
    body = {"access_token": token, "token_type": "Bearer", "expires_in": ttl}
    return _json(body, headers=_NO_STORE)


async def _session_grant(
    request: Request, issuer: LocalIssuer, form: dict[str, str], grant_type: str
) -> Response:
    """A web session's tokens (docs/inbox.md): public clients, so no client secret; the code or
    refresh token is the credential, bound to its client id."""
    services = request.app.state.services
    client_id = form.get("client_id", "")
    if not client_id:
        raise OAuthError("invalid_request", "client_id is required.")
    field = "code" if grant_type == SIGNIN_GRANT else "refresh_token"
    credential = form.get(field, "")
    if not credential:
        raise OAuthError("invalid_request", f"{field} is required.")
    sessions: Sessions = services.sessions
    try:
        if grant_type == SIGNIN_GRANT:
            session_ttl = int(services.settings.session_ttl)
            grant = await sessions.redeem(credential, client_id, session_ttl)
        else:
            grant = sessions.refresh(credential, client_id)
    except InvalidGrant as exc:
        raise OAuthError("invalid_grant", str(exc)) from None
    if await services.directory.get_app(client_id) is None:
        raise OAuthError("invalid_grant", "The app of this session is no longer registered.")
    now = int(sessions.clock())
    ttl = max(1, min(int(services.settings.token_ttl), grant.session_end - now))
    token = issuer.mint(client_id=client_id, user_id=grant.user_id, ttl_seconds=ttl)
    if grant_type == SIGNIN_GRANT:
        log.info("client %s: a sign-in code started a session", client_id)
    body = {
        "access_token": token,
        "token_type": "Bearer",
        "expires_in": ttl,
        "refresh_token": sessions.refresh_token(grant),
        "refresh_token_expires_in": grant.session_end - now,
        "scope": SCOPE,
    }
    return _json(body, headers=_NO_STORE)


async def _read_form(request: Request) -> dict[str, str]:
    """Parse a urlencoded body; RFC 6749 §3.2 forbids repeating a parameter."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != _FORM_TYPE:
        raise OAuthError("invalid_request", f"The request body must be {_FORM_TYPE}.")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > _MAX_FORM_BYTES:
            raise OAuthError("invalid_request", "The request body is too large.")
    try:
        parsed = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError:
        raise OAuthError("invalid_request", "The request body is not UTF-8.") from None
    repeated = sorted(name for name, values in parsed.items() if len(values) > 1)
    if repeated:
        raise OAuthError("invalid_request", f"Parameter repeated: {', '.join(repeated)}.")
    return {name: values[0] for name, values in parsed.items()}


def _client_credentials(request: Request, form: dict[str, str]) -> tuple[str, str]:
    """(client_id, secret) from HTTP Basic or the form — exactly one method (RFC 6749 §2.3)."""
    header = request.headers.get("authorization")
    if header is not None:
        if "client_secret" in form:
            raise OAuthError("invalid_request", "Use one client authentication method, not two.")
        client_id, secret = _basic(header)
        if form.get("client_id", client_id) != client_id:
            raise OAuthError("invalid_request", "client_id differs from the Basic credentials.")
        return client_id, secret
    client_id = form.get("client_id", "")
    secret = form.get("client_secret", "")
    if not client_id:
        raise OAuthError("invalid_request", "client_id is required.")
    if not secret:
        raise OAuthError("invalid_client", "Client authentication failed.", 401)
    return client_id, secret


def _basic(header: str) -> tuple[str, str]:
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        raise OAuthError(
            "invalid_client", "Only HTTP Basic client authentication is supported.", 401
        )
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise OAuthError("invalid_request", "Malformed Basic credentials.") from None
    user, sep, password = decoded.partition(":")
    if not sep or not user:
        raise OAuthError("invalid_request", "Malformed Basic credentials.")
    # RFC 6749 §2.3.1: both parts are form-urlencoded before being joined.
    return unquote_plus(user), unquote_plus(password)


def _check_scope(scope: str | None, audience: str) -> None:
    """Accept the permission name or Entra's `<resource>/.default` style; nothing else."""
    if scope is None:
        return
    accepted = {SCOPE, ".default", f"{audience}/.default", f"{audience}/{SCOPE}"}
    for item in scope.split():
        if item not in accepted and not item.endswith("/.default"):
            raise OAuthError("invalid_scope", f"Unknown scope {item!r}; request {SCOPE}.")


async def _authenticate(request: Request, client_id: str, secret: str) -> None:
    # A client id that cannot exist (too long, control characters, NUL that PostgreSQL text
    # refuses) is an unknown client, not a database error.
    plausible = len(client_id) <= 256 and client_id.isprintable()
    app = await request.app.state.services.directory.get_app(client_id) if plausible else None
    # The KDF takes tens of milliseconds: run it off the event loop. An unknown client is checked
    # against a dummy hash so that response time does not reveal which client ids exist.
    hashed = app.secret_hash if app is not None else _dummy_hash()
    ok = await run_in_threadpool(verify_secret, secret, hashed)
    if app is None or not ok:
        log.info("client authentication failed for client %s", client_id)
        raise OAuthError("invalid_client", "Client authentication failed.", 401)


@functools.cache
def _dummy_hash() -> str:
    return hash_secret("herald-dummy-secret-for-unknown-clients")


# --- helpers ---------------------------------------------------------------------------------


def _issuer(request: Request) -> LocalIssuer | None:
    issuer: LocalIssuer | None = request.app.state.services.issuer
    return issuer


def _endpoint_base(request: Request, issuer: LocalIssuer) -> str:
    # An http(s) issuer is the public base URL (Entra-style layout). A non-URL issuer (the
    # default `urn:herald:local` when no public_url is configured) says nothing about where
    # Herald listens, so the endpoints are those of the URL this request reached.
    if issuer.issuer.startswith(("https://", "http://")):
        return issuer.issuer.rstrip("/")
    return str(request.base_url).rstrip("/")


def _oauth_error(exc: OAuthError) -> Response:
    headers = dict(_NO_STORE)
    if exc.status == 401:
        headers["WWW-Authenticate"] = 'Basic realm="herald", error="invalid_client"'
    return _json(
        {"error": exc.error, "error_description": exc.description},
        status=exc.status,
        headers=headers,
    )


def _json(body: dict[str, Any], *, status: int = 200, headers: dict[str, str]) -> Response:
    return Response(
        msgspec.json.encode(body), status, headers=headers, media_type="application/json"
    )
