"""An OpenID Connect identity provider stand-in: authorization code flow with PKCE for public
clients (SPAs), refresh-token rotation, RS256 access tokens shaped like Entra ID v2 tokens.

It checks every request the way a strict IdP does and refuses with the standard codes
(RFC 6749 §4.1.2.1 / §5.2, RFC 7636 §4.4.1 / §4.6, OIDC Core §3.1.2.6), and records what it
issued and refused, so tests can prove a client speaks the protocol (and which grants it used):

```python
with IdpStandIn(clients={"herald-inbox": [f"{herald}/inbox/"]}, allowed_origins=[herald]) as idp:
    idp.issuer             # http://127.0.0.1:PORT/realms/test (discovery under it)
    idp.access_token_ttl = 6
    ...
    idp.issued(grant_type="refresh_token")   # Issued records (tokens and their claims)
    idp.refused(endpoint="token")            # Refusal records (error, description)
    idp.authorizations()                     # the validated /authorize requests' parameters
```

Endpoints, all under the issuer URL (which has a path, as Keycloak's and Entra's do):

* `/.well-known/openid-configuration`, `/jwks` (one RS256 key with a kid)
* `GET /authorize`: validates the request; an unknown client or a `redirect_uri` that is not
  exactly one registered for the client is an error page (never a redirect); anything else wrong
  goes back to the `redirect_uri` as `error=…&state=…`. PKCE is required, S256 only. A valid
  request shows a login form (a text input labelled "Username", buttons "Sign in" and "Cancel").
* `POST /login`: the form's submission; "Sign in" issues a single-use code (60 s) bound to the
  client, redirect_uri, code_challenge, scope, nonce and user and redirects to
  `redirect_uri?code=…&state=…&iss=…` (RFC 9207); "Cancel" redirects with `error=access_denied`.
* `POST /token`: grants `authorization_code` and `refresh_token` (rotated; offered only when
  `offline_access` was granted). A replayed code or refresh token is refused and revokes every
  refresh token descended from the same sign-in (RFC 6749 §4.1.2, OAuth 2.0 Security BCP §4.14).
  CORS (and preflights) only for the allowed origins; a token request from any other origin is
  refused (`invalid_request`, as Entra ID does for SPAs), the discovery document and JWKS are
  served without `Access-Control-Allow-Origin`.

Scopes: `openid profile email offline_access` and the API's delegated permissions, named
`<audience>/<permission>` (e.g. `api://herald/Notifications.ReadWrite.CreatedByApp`); the access
token carries the permissions in `scp` without the prefix, as Entra ID does.

Plain HTTP on 127.0.0.1 (browsers treat loopback as a secure context): Starlette on uvicorn in a
background thread.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import html
import re
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qs, urlencode, urlsplit

import uvicorn
from joserfc import jwt
from joserfc.jwk import RSAKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

PERMISSION = "Notifications.ReadWrite.CreatedByApp"
OIDC_SCOPES = ("openid", "profile", "email", "offline_access")
AUTHORIZATION_CODE = "authorization_code"
REFRESH_TOKEN = "refresh_token"
# The authorization request parameters the login form carries through (hidden fields).
AUTHORIZE_PARAMS = (
    "client_id",
    "redirect_uri",
    "response_type",
    "scope",
    "state",
    "code_challenge",
    "code_challenge_method",
    "nonce",
    "response_mode",
    "prompt",
    "login_hint",
)
VERIFIER = re.compile(r"[A-Za-z0-9._~-]{43,128}")  # RFC 7636 §4.1
S256_CHALLENGE = re.compile(r"[A-Za-z0-9_-]{43}")  # base64url(SHA-256), no padding
USERNAME = re.compile(r"[A-Za-z0-9._@+-]{1,64}")
MAX_PARAM = 2048
FORM = "application/x-www-form-urlencoded"
CORS_METHODS = ("GET", "POST")
CORS_HEADERS = frozenset({"content-type", "accept", "accept-language", "content-language"})


def s256(verifier: str) -> str:
    """The S256 code challenge of a PKCE code verifier (RFC 7636 §4.2)."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


# -- the record ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Issued:
    """Tokens the token endpoint issued."""

    grant_type: str  # "authorization_code" or "refresh_token"
    client_id: str
    user: str
    scope: str  # the granted scope, space-separated
    access_token: str
    claims: dict[str, Any]  # the access token's claims
    refresh_token: str | None
    id_token: str | None
    origin: str | None  # the request's Origin header (a browser's), None from a non-browser
    at: float


@dataclass(frozen=True)
class Refusal:
    """A request the IdP refused."""

    endpoint: str  # "authorize", "login", "token", "preflight"
    status: int  # HTTP status (302 for an error sent back to the redirect_uri)
    error: str  # the OAuth error code (RFC 6749), or "error_page" for a page that never redirects
    description: str
    grant_type: str | None = None
    client_id: str | None = None
    origin: str | None = None
    at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Authorization:
    """A valid /authorize request (the login form was shown): its parameters, single-valued."""

    params: dict[str, str]
    at: float


@dataclass(frozen=True)
class Seen:
    """Every request that reached the IdP."""

    method: str
    path: str  # relative to the issuer, e.g. "/token"
    origin: str | None
    status: int
    at: float


@dataclass
class _Code:
    client_id: str
    redirect_uri: str
    code_challenge: str
    scope: tuple[str, ...]
    user: str
    nonce: str | None
    auth_time: int
    expires: float
    family: str  # the sign-in this code and every token issued from it belong to
    used: bool = False


@dataclass
class _Refresh:
    client_id: str
    scope: tuple[str, ...]
    user: str
    auth_time: int
    expires: float
    family: str
    used: bool = False


class _OAuthError(Exception):
    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(f"{error}: {description}")
        self.error = error
        self.description = description
        self.status = status


class _ErrorPage(Exception):
    """An authorization request the IdP must not redirect back (RFC 6749 §4.1.2.1)."""


class _Redirect(Exception):
    """An authorization error to send back to the (verified) redirect_uri."""

    def __init__(self, redirect_uri: str, state: str | None, error: str, description: str) -> None:
        super().__init__(f"{error}: {description}")
        self.redirect_uri = redirect_uri
        self.state = state
        self.error = error
        self.description = description


# -- the stand-in -------------------------------------------------------------------------------


class IdpStandIn:
    """A strict OIDC provider for public clients. Use as a context manager or start()/stop()."""

    def __init__(
        self,
        *,
        clients: Mapping[str, Sequence[str]] | None = None,
        allowed_origins: Iterable[str] = (),
        audience: str = "api://herald",
        permissions: Sequence[str] = (PERMISSION,),
        access_token_ttl: int = 3600,
        refresh_token_ttl: int = 24 * 3600,
        code_ttl: int = 60,
        users: Iterable[str] | None = None,
        realm_path: str = "/realms/test",
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.clients: dict[str, tuple[str, ...]] = {
            c: tuple(uris) for c, uris in (clients or {}).items()
        }
        self.allowed_origins: set[str] = set(allowed_origins)
        self.audience = audience
        self.permissions = tuple(permissions)
        self.access_token_ttl = access_token_ttl
        self.refresh_token_ttl = refresh_token_ttl
        self.code_ttl = code_ttl
        self.users: set[str] | None = None if users is None else set(users)
        self.realm_path = "/" + realm_path.strip("/") if realm_path.strip("/") else ""
        self.host = host
        self.port = port
        self.key = RSAKey.generate_key(
            2048, parameters={"use": "sig", "alg": "RS256"}, private=True, auto_kid=True
        )
        self.kid: str = self.key.kid or self.key.thumbprint()
        self._offset = 0.0
        self._lock = threading.Condition()
        self._codes: dict[str, _Code] = {}
        self._refresh: dict[str, _Refresh] = {}
        self._revoked: set[str] = set()  # families
        self._issued: list[Issued] = []
        self._refused: list[Refusal] = []
        self._authorizations: list[Authorization] = []
        self._seen: list[Seen] = []
        self._base: str | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.app = self._make_app()

    # -- configuration

    def add_client(self, client_id: str, redirect_uris: Sequence[str]) -> None:
        self.clients[client_id] = tuple(redirect_uris)

    def allow_origin(self, origin: str) -> None:
        self.allowed_origins.add(origin)

    def advance(self, seconds: float) -> None:
        """Move the IdP's clock forward (codes and refresh tokens expire; new tokens are dated
        from the new time)."""
        self._offset += seconds

    def now(self) -> float:
        return time.time() + self._offset

    # -- addresses

    @property
    def url(self) -> str:
        """The server's base URL (scheme, host, port), once started."""
        if self._base is None:
            raise RuntimeError("the IdP stand-in is not started")
        return self._base

    @property
    def origin(self) -> str:
        return self.url

    @property
    def issuer(self) -> str:
        return self.url + self.realm_path

    @property
    def discovery_url(self) -> str:
        return self.issuer + "/.well-known/openid-configuration"

    @property
    def jwks_url(self) -> str:
        return self.issuer + "/jwks"

    @property
    def authorization_endpoint(self) -> str:
        return self.issuer + "/authorize"

    @property
    def token_endpoint(self) -> str:
        return self.issuer + "/token"

    def api_scope(self, permission: str = PERMISSION) -> str:
        """The scope value a client requests for one of the API's permissions."""
        return f"{self.audience}/{permission}"

    def jwks(self) -> dict[str, Any]:
        return {"keys": [dict(self.key.as_dict(private=False, kid=self.kid))]}

    # -- the record

    def issued(
        self, grant_type: str | None = None, *, client_id: str | None = None
    ) -> list[Issued]:
        with self._lock:
            return [
                i
                for i in self._issued
                if (grant_type is None or i.grant_type == grant_type)
                and (client_id is None or i.client_id == client_id)
            ]

    def refused(self, endpoint: str | None = None, *, error: str | None = None) -> list[Refusal]:
        with self._lock:
            return [
                r
                for r in self._refused
                if (endpoint is None or r.endpoint == endpoint)
                and (error is None or r.error == error)
            ]

    def authorizations(self) -> list[Authorization]:
        with self._lock:
            return list(self._authorizations)

    def seen(self, path: str | None = None, *, method: str | None = None) -> list[Seen]:
        with self._lock:
            return [
                s
                for s in self._seen
                if (path is None or s.path == path) and (method is None or s.method == method)
            ]

    def wait_issued(
        self, count: int, *, grant_type: str | None = None, timeout: float = 10.0
    ) -> list[Issued]:
        """Block until `count` tokens (of `grant_type`) were issued; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(found := self.issued(grant_type)) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"{len(found)} of {count} {grant_type or 'token'} grant(s) issued in "
                        f"{timeout}s; refused: {self._refused[-5:]}"
                    )
                self._lock.wait(left)
            return found

    def describe(self) -> str:
        """A summary for assertion messages."""
        with self._lock:
            grants = [i.grant_type for i in self._issued]
            refusals = [(r.endpoint, r.error, r.description) for r in self._refused]
            seen = [(s.method, s.path, s.status) for s in self._seen]
        return f"issued: {grants}; refused: {refusals}; requests: {seen}"

    def reset(self) -> None:
        """Forget the record (codes, refresh tokens and configuration stay)."""
        with self._lock:
            self._issued.clear()
            self._refused.clear()
            self._authorizations.clear()
            self._seen.clear()

    def _record(self, item: Issued | Refusal | Authorization | Seen) -> None:
        with self._lock:
            if isinstance(item, Issued):
                self._issued.append(item)
            elif isinstance(item, Refusal):
                self._refused.append(item)
            elif isinstance(item, Authorization):
                self._authorizations.append(item)
            else:
                self._seen.append(item)
            self._lock.notify_all()

    # -- lifecycle

    def start(self, timeout: float = 15.0) -> str:
        if self._thread is not None:
            raise RuntimeError("the IdP stand-in was already started")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(128)
        port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            ws="none",
            timeout_graceful_shutdown=2,
        )
        server = uvicorn.Server(config)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                asyncio.run(server.serve(sockets=[sock]))
            except BaseException as e:  # reported by start()
                errors.append(e)
            finally:
                sock.close()

        self._server = server
        self._thread = threading.Thread(target=run, name="standin-idp", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if errors or not self._thread.is_alive():
                raise RuntimeError("the IdP stand-in failed to start") from (
                    errors[0] if errors else None
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"the IdP stand-in did not start within {timeout}s")
            time.sleep(0.01)
        self._base = f"http://{self.host}:{port}"
        return self.issuer

    def stop(self, timeout: float = 15.0) -> None:
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.should_exit = True
        thread.join(timeout)
        if thread.is_alive():
            raise RuntimeError(f"the IdP stand-in did not stop within {timeout}s")
        self._server = self._thread = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- the app

    def _make_app(self) -> Any:
        p = self.realm_path
        routes = [
            Route(p + "/.well-known/openid-configuration", self._discovery, methods=["GET"]),
            Route(p + "/jwks", self._jwks, methods=["GET"]),
            Route(p + "/authorize", self._authorize, methods=["GET"]),
            Route(p + "/login", self._login, methods=["POST"]),
            Route(p + "/token", self._token, methods=["POST"]),
        ]
        for route in (
            "/.well-known/openid-configuration",
            "/jwks",
            "/token",
        ):
            routes.append(Route(p + route, self._preflight, methods=["OPTIONS"]))
        inner = Starlette(routes=routes)
        idp = self

        class Recorder:
            """Records every request (method, path, Origin, status)."""

            async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
                if scope["type"] != "http":
                    await inner(scope, receive, send)
                    return
                status = [0]

                async def sending(message: dict[str, Any]) -> None:
                    if message["type"] == "http.response.start":
                        status[0] = message["status"]
                    await send(message)

                await inner(scope, receive, sending)
                origin = next(
                    (v.decode("latin-1") for k, v in scope["headers"] if k == b"origin"), None
                )
                path = scope["path"].removeprefix(p) if p else scope["path"]
                idp._record(Seen(scope["method"], path, origin, status[0], idp.now()))

        return Recorder()

    # -- CORS

    def _cors(self, request: Request) -> dict[str, str]:
        origin = request.headers.get("origin")
        headers = {"Vary": "Origin"}
        if origin is not None and origin in self.allowed_origins:
            headers["Access-Control-Allow-Origin"] = origin
        return headers

    async def _preflight(self, request: Request) -> Response:
        origin = request.headers.get("origin")
        method = request.headers.get("access-control-request-method")
        wanted = request.headers.get("access-control-request-headers", "")
        names = {h.strip().lower() for h in wanted.split(",") if h.strip()}
        problem = None
        if origin is None or method is None:
            problem = "not a CORS preflight (Origin and Access-Control-Request-Method needed)"
        elif origin not in self.allowed_origins:
            problem = f"origin {origin} is not allowed"
        elif method not in CORS_METHODS:
            problem = f"method {method} is not allowed"
        elif names - CORS_HEADERS:
            problem = f"headers {sorted(names - CORS_HEADERS)} are not allowed"
        if problem is not None:
            self._record(Refusal("preflight", 403, "cors", problem, origin=origin, at=self.now()))
            return Response(status_code=403, headers={"Vary": "Origin"})
        return Response(
            status_code=204,
            headers={
                "Access-Control-Allow-Origin": origin or "",
                "Access-Control-Allow-Methods": ", ".join(CORS_METHODS),
                "Access-Control-Allow-Headers": ", ".join(sorted(CORS_HEADERS)),
                "Access-Control-Max-Age": "600",
                "Vary": "Origin",
            },
        )

    # -- discovery

    async def _discovery(self, request: Request) -> Response:
        doc = {
            "issuer": self.issuer,
            "authorization_endpoint": self.authorization_endpoint,
            "token_endpoint": self.token_endpoint,
            "jwks_uri": self.jwks_url,
            "response_types_supported": ["code"],
            "response_modes_supported": ["query"],
            "grant_types_supported": [AUTHORIZATION_CODE, REFRESH_TOKEN],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": ["none"],
            "scopes_supported": [*OIDC_SCOPES, *(self.api_scope(p) for p in self.permissions)],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "claims_supported": ["iss", "sub", "aud", "exp", "iat", "auth_time", "nonce", "name"],
            "authorization_response_iss_parameter_supported": True,
        }
        return JSONResponse(doc, headers=self._cors(request))

    async def _jwks(self, request: Request) -> Response:
        return JSONResponse(self.jwks(), headers=self._cors(request))

    # -- authorization

    async def _authorize(self, request: Request) -> Response:
        params = parse_qs(request.url.query, keep_blank_values=True)
        return self._authorization_step("authorize", params, None, None)

    async def _login(self, request: Request) -> Response:
        body = await request.body()
        try:
            params = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
        except UnicodeDecodeError:
            return self._error_page("login", "the form is not UTF-8")
        action = _single(params, "action") or "login"
        username = (_single(params, "username") or "").strip()
        params = {k: v for k, v in params.items() if k in AUTHORIZE_PARAMS}
        return self._authorization_step("login", params, action, username)

    def _authorization_step(
        self,
        endpoint: str,
        params: dict[str, list[str]],
        action: str | None,
        username: str | None,
    ) -> Response:
        try:
            request = self._validate_authorization(params)
        except _ErrorPage as e:
            return self._error_page(endpoint, str(e), params)
        except _Redirect as e:
            return self._redirect_error(endpoint, e, params)
        client_id, redirect_uri, state = (
            request["client_id"],
            request["redirect_uri"],
            request.get("state"),
        )
        if action is None:  # GET /authorize: show the form
            self._record(Authorization(request, self.now()))
            return self._form(request)
        if action == "cancel":
            error = _Redirect(redirect_uri, state, "access_denied", "the user cancelled sign-in")
            return self._redirect_error(endpoint, error, params)
        if action != "login":
            return self._error_page(endpoint, f"unknown action {action!r}", params)
        problem = None
        if not username:
            problem = "Enter your username."
        elif not USERNAME.fullmatch(username):
            problem = "A username is 1 to 64 letters, digits and . _ @ + -"
        elif self.users is not None and username not in self.users:
            problem = "Unknown username."
        if problem is not None:
            self._record(
                Refusal(endpoint, 200, "login_failed", problem, client_id=client_id, at=self.now())
            )
            return self._form(request, problem, username or "")
        now = self.now()
        code = secrets.token_urlsafe(32)
        with self._lock:
            self._codes[code] = _Code(
                client_id=client_id,
                redirect_uri=redirect_uri,
                code_challenge=request["code_challenge"],
                scope=tuple(request["scope"].split()),
                user=username or "",
                nonce=request.get("nonce"),
                auth_time=int(now),
                expires=now + self.code_ttl,
                family=uuid.uuid4().hex,
            )
        answer = {"code": code}
        if state is not None:
            answer["state"] = state
        answer["iss"] = self.issuer
        return _redirect(redirect_uri, answer)

    def _validate_authorization(self, params: dict[str, list[str]]) -> dict[str, str]:
        """The single-valued authorization request, or _ErrorPage / _Redirect."""
        for name in ("client_id", "redirect_uri"):
            if len(params.get(name, [])) > 1:
                raise _ErrorPage(f"{name} was given more than once")
        client_id = _single(params, "client_id")
        if not client_id:
            raise _ErrorPage("the request has no client_id")
        if client_id not in self.clients:
            raise _ErrorPage(f"unknown client {client_id!r}")
        redirect_uri = _single(params, "redirect_uri")
        if not redirect_uri:
            raise _ErrorPage("the request has no redirect_uri (OpenID Connect requires it)")
        if redirect_uri not in self.clients[client_id]:
            raise _ErrorPage(f"redirect_uri {redirect_uri!r} is not registered for {client_id!r}")
        states = params.get("state", [])
        state = states[0] if states else None

        def fail(error: str, description: str) -> _Redirect:
            return _Redirect(redirect_uri, state, error, description)

        out: dict[str, str] = {}
        for name in AUTHORIZE_PARAMS:
            values = params.get(name, [])
            if len(values) > 1:
                raise fail("invalid_request", f"{name} was given more than once")
            if values:
                if len(values[0]) > MAX_PARAM:
                    raise fail("invalid_request", f"{name} is too long")
                out[name] = values[0]
        response_type = out.get("response_type")
        if not response_type:
            raise fail("invalid_request", "response_type is missing")
        if response_type != "code":
            raise fail("unsupported_response_type", "only response_type=code is supported")
        if out.get("response_mode", "query") != "query":
            raise fail("invalid_request", "only response_mode=query is supported")
        scope = out.get("scope", "").split()
        if "openid" not in scope:
            raise fail("invalid_scope", "the scope must include openid")
        known = {*OIDC_SCOPES, *(self.api_scope(p) for p in self.permissions)}
        unknown = [s for s in scope if s not in known]
        if unknown:
            raise fail("invalid_scope", f"unknown scope {unknown[0]!r}")
        challenge = out.get("code_challenge")
        method = out.get("code_challenge_method")
        if not challenge:
            raise fail("invalid_request", "code_challenge is required (PKCE, RFC 7636)")
        if method is None:
            # RFC 7636 §4.3: a missing method means "plain", which this IdP does not allow.
            raise fail("invalid_request", "code_challenge_method is required; only S256")
        if method != "S256":
            raise fail("invalid_request", f"code_challenge_method {method!r} is not supported")
        if not S256_CHALLENGE.fullmatch(challenge):
            raise fail("invalid_request", "an S256 code_challenge is 43 base64url characters")
        if "none" in out.get("prompt", "").split():
            raise fail("login_required", "the user is not signed in at the IdP")
        return out

    def _form(self, request: dict[str, str], problem: str = "", username: str = "") -> Response:
        hidden = "\n".join(
            f'<input type="hidden" name="{n}" value="{html.escape(v)}">' for n, v in request.items()
        )
        alert = f'<p role="alert" class="error">{html.escape(problem)}</p>' if problem else ""
        value = html.escape(username or request.get("login_hint", ""))
        page = f"""<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<link rel="icon" href="data:,">
<title>Sign in · IdP stand-in</title>
<style>body{{font:16px system-ui;margin:2rem}}.error{{color:#b00}}</style></head>
<body><main>
<h1>Sign in</h1>
<p>to continue to <strong>{html.escape(request["client_id"])}</strong></p>
{alert}
<form method="post" action="{self.realm_path}/login">
{hidden}
<p><label for="username">Username</label>
<input id="username" name="username" type="text" autocomplete="username" required
 value="{value}"></p>
<p><button type="submit" name="action" value="login">Sign in</button>
<button type="submit" name="action" value="cancel" formnovalidate>Cancel</button></p>
</form>
</main></body></html>
"""
        return HTMLResponse(page, headers=_page_headers())

    def _error_page(
        self, endpoint: str, description: str, params: dict[str, list[str]] | None = None
    ) -> Response:
        client_id = _single(params or {}, "client_id")
        self._record(
            Refusal(endpoint, 400, "error_page", description, client_id=client_id, at=self.now())
        )
        page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><link rel="icon" href="data:,">
<title>Sign-in error · IdP stand-in</title></head>
<body><main><h1>Sign-in error</h1><p role="alert">{html.escape(description)}</p></main></body>
</html>
"""
        return HTMLResponse(page, status_code=400, headers=_page_headers())

    def _redirect_error(
        self, endpoint: str, e: _Redirect, params: dict[str, list[str]]
    ) -> Response:
        self._record(
            Refusal(
                endpoint,
                302,
                e.error,
                e.description,
                client_id=_single(params, "client_id"),
                at=self.now(),
            )
        )
        answer = {"error": e.error, "error_description": e.description}
        if e.state is not None:
            answer["state"] = e.state
        answer["iss"] = self.issuer
        return _redirect(e.redirect_uri, answer)

    # -- the token endpoint

    async def _token(self, request: Request) -> Response:
        origin = request.headers.get("origin")
        cors = self._cors(request)
        grant_type: str | None = None
        client_id: str | None = None
        try:
            if origin is not None and origin not in self.allowed_origins:
                raise _OAuthError(
                    "invalid_request", f"cross-origin token redemption from {origin} is not allowed"
                )
            content_type = request.headers.get("content-type", "")
            if content_type.split(";")[0].strip().lower() != FORM:
                raise _OAuthError("invalid_request", f"the body must be {FORM}")
            body = await request.body()
            try:
                form = parse_qs(body.decode("utf-8"), keep_blank_values=True)
            except UnicodeDecodeError:
                raise _OAuthError("invalid_request", "the body is not UTF-8") from None
            for name, values in form.items():
                if len(values) > 1:
                    raise _OAuthError("invalid_request", f"{name} was given more than once")
            params = {k: v[0] for k, v in form.items()}
            grant_type = params.get("grant_type")
            client_id = params.get("client_id")
            if request.headers.get("authorization") or "client_secret" in params:
                raise _OAuthError(
                    "invalid_client", "public clients do not authenticate (no secret)", 401
                )
            if not client_id or client_id not in self.clients:
                raise _OAuthError("invalid_client", f"unknown client {client_id!r}", 401)
            if not grant_type:
                raise _OAuthError("invalid_request", "grant_type is missing")
            if grant_type == AUTHORIZATION_CODE:
                answer = self._redeem_code(params, client_id, origin)
            elif grant_type == REFRESH_TOKEN:
                answer = self._redeem_refresh(params, client_id, origin)
            else:
                raise _OAuthError("unsupported_grant_type", f"grant_type {grant_type!r}")
        except _OAuthError as e:
            self._record(
                Refusal(
                    "token",
                    e.status,
                    e.error,
                    e.description,
                    grant_type=grant_type,
                    client_id=client_id,
                    origin=origin,
                    at=self.now(),
                )
            )
            body_json = {"error": e.error, "error_description": e.description}
            headers = {**cors, "Cache-Control": "no-store", "Pragma": "no-cache"}
            return JSONResponse(body_json, status_code=e.status, headers=headers)
        headers = {**cors, "Cache-Control": "no-store", "Pragma": "no-cache"}
        return JSONResponse(answer, headers=headers)

    def _redeem_code(
        self, params: dict[str, str], client_id: str, origin: str | None
    ) -> dict[str, Any]:
        code_value = params.get("code")
        redirect_uri = params.get("redirect_uri")
        verifier = params.get("code_verifier")
        if not code_value:
            raise _OAuthError("invalid_request", "code is missing")
        if not redirect_uri:
            raise _OAuthError("invalid_request", "redirect_uri is missing")
        now = self.now()
        with self._lock:
            code = self._codes.get(code_value)
            if code is None:
                raise _OAuthError("invalid_grant", "unknown authorization code")
            if code.used:
                # RFC 6749 §4.1.2: deny, and revoke what was issued from this code.
                self._revoked.add(code.family)
                raise _OAuthError("invalid_grant", "the authorization code was already used")
            code.used = True  # single use: any attempt consumes it
        if now > code.expires:
            raise _OAuthError("invalid_grant", "the authorization code expired")
        if code.client_id != client_id:
            raise _OAuthError("invalid_grant", "the code was issued to another client")
        if code.redirect_uri != redirect_uri:
            raise _OAuthError("invalid_grant", "redirect_uri differs from the authorization's")
        if not verifier:
            raise _OAuthError("invalid_grant", "code_verifier is missing (PKCE)")
        if not VERIFIER.fullmatch(verifier):
            raise _OAuthError("invalid_grant", "code_verifier is not 43-128 unreserved characters")
        if not secrets.compare_digest(s256(verifier), code.code_challenge):
            raise _OAuthError("invalid_grant", "code_verifier does not match the code_challenge")
        return self._grant(
            AUTHORIZATION_CODE,
            client_id,
            code.user,
            code.scope,
            code.family,
            code.auth_time,
            code.nonce,
            origin,
        )

    def _redeem_refresh(
        self, params: dict[str, str], client_id: str, origin: str | None
    ) -> dict[str, Any]:
        value = params.get("refresh_token")
        if not value:
            raise _OAuthError("invalid_request", "refresh_token is missing")
        now = self.now()
        with self._lock:
            token = self._refresh.get(value)
            if token is None:
                raise _OAuthError("invalid_grant", "unknown refresh token")
            if token.used:
                # A rotated refresh token used again: stolen or replayed. Revoke the sign-in.
                self._revoked.add(token.family)
                raise _OAuthError("invalid_grant", "the refresh token was already used")
            if token.family in self._revoked:
                raise _OAuthError("invalid_grant", "the refresh token was revoked")
            if now > token.expires:
                raise _OAuthError("invalid_grant", "the refresh token expired")
            if token.client_id != client_id:
                raise _OAuthError("invalid_grant", "the refresh token was issued to another client")
            token.used = True
        scope = token.scope
        if "scope" in params:
            asked = tuple(params["scope"].split())
            extra = [s for s in asked if s not in token.scope]
            if extra:
                raise _OAuthError("invalid_scope", f"scope {extra[0]!r} was not granted")
            scope = asked
        return self._grant(
            REFRESH_TOKEN, client_id, token.user, scope, token.family, token.auth_time, None, origin
        )

    def _grant(
        self,
        grant_type: str,
        client_id: str,
        user: str,
        scope: tuple[str, ...],
        family: str,
        auth_time: int,
        nonce: str | None,
        origin: str | None,
    ) -> dict[str, Any]:
        now = int(self.now())
        ttl = int(self.access_token_ttl)
        prefix = self.audience + "/"
        permissions = [s.removeprefix(prefix) for s in scope if s.startswith(prefix)]
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "azp": client_id,
            "sub": user,
            "oid": user,
            "preferred_username": user,
            "iat": now,
            "nbf": now,
            "exp": now + ttl,
            "jti": uuid.uuid4().hex,
            "ver": "2.0",
        }
        if permissions:
            claims["scp"] = " ".join(permissions)
        header = {"alg": "RS256", "typ": "JWT", "kid": self.kid}
        access_token = jwt.encode(header, claims, self.key, algorithms=["RS256"])
        answer: dict[str, Any] = {
            "access_token": access_token,
            "token_type": "Bearer",
            "expires_in": ttl,
            "scope": " ".join(scope),
        }
        id_token = None
        if "openid" in scope:
            half = hashlib.sha256(access_token.encode("ascii")).digest()[:16]
            id_claims: dict[str, Any] = {
                "iss": self.issuer,
                "aud": client_id,
                "azp": client_id,
                "sub": user,
                "preferred_username": user,
                "iat": now,
                "exp": now + ttl,
                "auth_time": auth_time,
                "at_hash": base64.urlsafe_b64encode(half).rstrip(b"=").decode("ascii"),
            }
            if nonce is not None:
                id_claims["nonce"] = nonce
            id_token = jwt.encode(header, id_claims, self.key, algorithms=["RS256"])
            answer["id_token"] = id_token
        refresh_token = None
        if "offline_access" in scope:
            refresh_token = secrets.token_urlsafe(32)
            with self._lock:
                self._refresh[refresh_token] = _Refresh(
                    client_id=client_id,
                    scope=scope,
                    user=user,
                    auth_time=auth_time,
                    expires=now + self.refresh_token_ttl,
                    family=family,
                )
            answer["refresh_token"] = refresh_token
        self._record(
            Issued(
                grant_type=grant_type,
                client_id=client_id,
                user=user,
                scope=" ".join(scope),
                access_token=access_token,
                claims=claims,
                refresh_token=refresh_token,
                id_token=id_token,
                origin=origin,
                at=now,
            )
        )
        return answer


def _single(params: Mapping[str, list[str]], name: str) -> str | None:
    values = params.get(name)
    return values[0] if values else None


def _redirect(uri: str, params: Mapping[str, str]) -> Response:
    joiner = "&" if urlsplit(uri).query else "?"
    response = RedirectResponse(uri + joiner + urlencode(params), status_code=302)
    response.headers["Cache-Control"] = "no-store"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


def _page_headers() -> dict[str, str]:
    return {
        "Cache-Control": "no-store",
        "Content-Security-Policy": "frame-ancestors 'none'",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }
