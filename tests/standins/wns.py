"""WNS stand-in: the OAuth token endpoint (login.live.com/accesstoken.srf) and channel URIs
(https://*.notify.windows.com/?token=...) taking POST notifications and DELETE removals."""

from __future__ import annotations

import json
import re
import secrets
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.standins.base import (
    SEND,
    TOKEN,
    Delivery,
    Fault,
    Refused,
    Request,
    Response,
    StandIn,
)
from tests.standins.tls import TlsFiles

TOKEN_PATH = "/accesstoken.srf"
CHANNEL_PATH = "/"
SCOPE = "notify.windows.com"
CONTENT_TYPES = {
    "wns/toast": "text/xml",
    "wns/tile": "text/xml",
    "wns/badge": "text/xml",
    "wns/raw": "application/octet-stream",
}
XML_ROOTS = {"wns/toast": "toast", "wns/tile": "tile", "wns/badge": "badge"}
MAX_PAYLOAD = 5000  # "The notification payload exceeds the 5000 byte size limit."
# The docs say "alphanumeric, at most 16 characters"; '-', '_' and '.' are taken too (the
# base64url labels Herald derives contain them).
LABEL = re.compile(r"[A-Za-z0-9_.-]{1,16}")
DIGITS = re.compile(r"[0-9]+")
FAULT_DESCRIPTIONS = {
    400: "One or more headers were specified incorrectly",
    401: "Invalid token",
    403: "The cloud service is not authorized to send a notification to this URI",
    404: "The channel URI is not valid or is not recognized by WNS",
    406: "The cloud service exceeded its throttle limit",
    410: "The channel expired",
    413: "The notification payload exceeds the 5000 byte size limit",
    500: "An internal failure caused notification delivery to fail",
    503: "The server is currently unavailable",
}


@dataclass
class AccessToken:
    client_id: str
    expires: float


def _msg_id() -> str:
    return secrets.token_hex(8).upper()


def _refuse(
    status: int,
    reason: str,
    detail: str,
    headers: list[tuple[str, str]] | None = None,
) -> Refused:
    out = [
        ("x-wns-error-description", detail),
        ("x-wns-msg-id", _msg_id()),
        ("x-wns-debug-trace", "STANDIN"),
        ("x-wns-status", "dropped"),
        *(headers or []),
    ]
    return Refused(Response(status, b"", out), reason, detail)


def _oauth_error(error: str, description: str) -> Refused:
    body = {"error": error, "error_description": description}
    return Refused(Response.json(400, body), error, description)


def _media_type(value: str | None) -> str:
    return (value or "").split(";")[0].strip().lower()


class WnsStandIn(StandIn):
    """WNS for one app (package SID `client_id`, `client_secret`); more with add_app().
    Channel URIs: new_channel(). `token_lifetime` is the access tokens' expires_in."""

    provider = "wns"

    def __init__(
        self,
        tls: TlsFiles,
        *,
        client_id: str | None = None,
        client_secret: str | None = None,
        token_lifetime: int = 86400,
        host: str = "127.0.0.1",
        port: int = 0,
        keep: int | None = None,
    ) -> None:
        super().__init__(tls, host=host, port=port, keep=keep)
        self.token_lifetime = token_lifetime
        self._lock = threading.Lock()
        self._apps: dict[str, str] = {}
        self._channels: dict[str, str] = {}  # channel token -> client id
        self._access: dict[str, AccessToken] = {}
        self.client_id, self.client_secret = self.add_app(client_id, client_secret)

    # -- apps and channels

    def add_app(
        self, client_id: str | None = None, client_secret: str | None = None
    ) -> tuple[str, str]:
        """Register an app: (package SID "ms-app://s-1-15-2-…", client secret)."""
        sid = client_id or "ms-app://s-1-15-2-" + "-".join(
            str(secrets.randbelow(4_000_000_000) + 100_000_000) for _ in range(7)
        )
        secret = client_secret or secrets.token_urlsafe(24)
        with self._lock:
            self._apps[sid] = secret
        return sid, secret

    def new_channel(self, client_id: str | None = None) -> str:
        """A channel URI of an app instance of `client_id` (default: the app), shaped like the
        real ones: <url>/?token=<base64, percent-encoded in lower case>."""
        raw = "AwYAAAB" + secrets.token_urlsafe(90).replace("-", "+").replace("_", "/") + "="
        with self._lock:
            self._channels[raw] = client_id or self.client_id
        quoted = "".join(f"%{ord(c):02x}" if c in "+/=" else c for c in raw)
        return f"{self.url}{CHANNEL_PATH}?token={quoted}"

    def expire_tokens(self) -> None:
        """Every access token issued so far is expired from now on (requests: 401)."""
        with self._lock:
            for t in self._access.values():
                t.expires = 0

    def revoke_token(self, access_token: str) -> None:
        with self._lock:
            self._access.pop(access_token, None)

    def create(self, **options: Any) -> Any:
        return self.new_channel(options.get("client_id"))

    def target_of(self, value: str) -> str:
        if "://" in value and "?" in value:
            tokens = parse_qs(urlsplit(value).query).get("token")
            if tokens:
                return tokens[0]
        return value

    @property
    def token_url(self) -> str:
        return f"{self.url}{TOKEN_PATH}"

    def info(self) -> dict[str, Any]:
        info = super().info()
        info.update(
            token_url=self.token_url,
            client_id=self.client_id,
            client_secret=self.client_secret,
        )
        return info

    def control_extra(self, name: str, body: dict[str, Any]) -> Response | None:
        if name == "expire-tokens":
            self.expire_tokens()
            return Response.json(200, {"ok": True})
        return None

    def removals(self, target: str | None = None) -> list[Delivery]:
        """The accepted DELETEs (toasts removed from Action Center)."""
        return self.accepted(target, kind="delete")

    # -- the service

    def route(self, req: Request) -> tuple[str, str | None]:
        if req.path == TOKEN_PATH:
            return TOKEN, None
        if req.path == CHANNEL_PATH:
            tokens = req.params().get("token")
            return SEND, tokens[0] if tokens else None
        return SEND, None

    def gone_refusal(self, target: str, status: int | None) -> Refused:
        return _refuse(status or 410, "Gone", "The channel expired")

    def fault_response(self, fault: Fault, on: str, target: str | None) -> Response:
        if on == TOKEN:
            error = fault.reason or ("invalid_client" if fault.status < 500 else "server_error")
            return Response.json(fault.status, {"error": error}, fault.headers.items())
        detail = fault.reason or FAULT_DESCRIPTIONS.get(fault.status, "scripted fault")
        status = "channelthrottled" if fault.status == 406 else "dropped"
        headers = [
            ("x-wns-error-description", detail),
            ("x-wns-msg-id", _msg_id()),
            ("x-wns-status", status),
            *fault.headers.items(),
        ]
        return Response(fault.status, b"", headers)

    async def handle(self, req: Request, on: str, target: str | None) -> Response:
        if on == TOKEN:
            return self._token(req)
        if req.method not in ("POST", "DELETE"):
            raise _refuse(405, "MethodNotAllowed", f"{req.method}: only POST and DELETE")
        with self._lock:
            owner = self._channels.get(target) if target is not None else None
        if target is None or owner is None:
            raise _refuse(404, "NotFound", "The channel URI is not valid or not recognized")
        self._authorize(req, owner)
        self.check_gone(target)
        if req.method == "DELETE":
            return self._delete(req, target)
        return self._notify(req, target)

    # -- OAuth

    def _token(self, req: Request) -> Response:
        if req.method != "POST":
            raise Refused(Response(405), "MethodNotAllowed", req.method)
        if _media_type(req.header("content-type")) != "application/x-www-form-urlencoded":
            raise _oauth_error("invalid_request", "the body must be form-urlencoded")
        try:
            form = parse_qs(req.body.decode("ascii"), strict_parsing=True)
        except (UnicodeDecodeError, ValueError) as e:
            raise _oauth_error("invalid_request", f"malformed form: {e}") from e
        values = {k: v[0] for k, v in form.items()}
        missing = [
            k for k in ("grant_type", "client_id", "client_secret", "scope") if not values.get(k)
        ]
        if missing:
            raise _oauth_error("invalid_request", f"missing {', '.join(missing)}")
        if values["grant_type"] != "client_credentials":
            raise _oauth_error("unsupported_grant_type", "grant_type must be client_credentials")
        with self._lock:
            secret = self._apps.get(values["client_id"])
        if secret is None:
            raise _oauth_error("invalid_client", "Invalid client id")
        if not secrets.compare_digest(secret, values["client_secret"]):
            raise _oauth_error("invalid_client", "Invalid client secret")
        if values["scope"] != SCOPE:
            raise _oauth_error("invalid_scope", f"scope must be {SCOPE}")
        token = secrets.token_urlsafe(48).replace("-", "+").replace("_", "/") + "="
        with self._lock:
            self._access[token] = AccessToken(
                values["client_id"], time.time() + self.token_lifetime
            )
        self.journal.count("tokens_issued")
        body = {"access_token": token, "token_type": "bearer", "expires_in": self.token_lifetime}
        return Response.json(200, body, [("cache-control", "no-store")])

    def _authorize(self, req: Request, owner: str) -> None:
        auth = req.header("authorization") or ""
        scheme, _, value = auth.strip().partition(" ")
        with self._lock:
            token = self._access.get(value.strip()) if scheme.lower() == "bearer" else None
        if token is None:
            www = 'Bearer error="invalid_request",error_description="Invalid token"'
            detail = "no access token" if not auth else "Invalid token"
            raise _refuse(401, "Unauthorized", detail, [("www-authenticate", www)])
        if token.expires <= time.time():
            www = 'Bearer error="invalid_token",error_description="Token expired"'
            raise _refuse(401, "Unauthorized", "Token expired", [("www-authenticate", www)])
        if token.client_id != owner:
            detail = "the access token is not the credentials of the app that owns the channel"
            raise _refuse(403, "Forbidden", detail)

    # -- notifications

    def _headers(self, req: Request) -> dict[str, Any]:
        """The optional X-WNS-* headers, checked; their values."""
        out: dict[str, Any] = {}
        for name in (
            "x-wns-type",
            "x-wns-ttl",
            "x-wns-priority",
            "x-wns-tag",
            "x-wns-group",
            "x-wns-cache-policy",
            "x-wns-requestforstatus",
            "x-wns-match",
        ):
            if req.header_count(name) > 1:
                raise _refuse(400, "BadRequest", f"{name} appears more than once")
        if req.header("x-wns-suppresspopup") is not None:
            detail = "X-WNS-SuppressPopup is for Windows Phone channels only"
            raise _refuse(400, "BadRequest", detail)
        ttl = req.header("x-wns-ttl")
        if ttl is not None:
            if not DIGITS.fullmatch(ttl):
                raise _refuse(400, "BadRequest", f"X-WNS-TTL must be an integer, not {ttl!r}")
            out["ttl"] = int(ttl)
        priority = req.header("x-wns-priority")
        if priority is not None:
            if priority not in ("1", "2", "3", "4"):
                raise _refuse(400, "BadRequest", f"X-WNS-Priority must be 1 to 4, not {priority!r}")
            out["priority"] = int(priority)
        for name in ("tag", "group"):
            value = req.header(f"x-wns-{name}")
            if value is not None:
                if not LABEL.fullmatch(value):
                    detail = f"X-WNS-{name.capitalize()} must be 1 to 16 characters, not {value!r}"
                    raise _refuse(400, "BadRequest", detail)
                out[name] = value
        cache = req.header("x-wns-cache-policy")
        if cache is not None:
            if cache not in ("cache", "no-cache"):
                raise _refuse(400, "BadRequest", f"X-WNS-Cache-Policy {cache!r}")
            out["cache_policy"] = cache
        status = req.header("x-wns-requestforstatus")
        if status is not None:
            if status.lower() not in ("true", "false"):
                raise _refuse(400, "BadRequest", f"X-WNS-RequestForStatus {status!r}")
            out["request_for_status"] = status.lower() == "true"
        return out

    def _notify(self, req: Request, target: str) -> Response:
        if req.header("content-length") is None:
            detail = "Content-Length is required (chunking is not supported)"
            raise _refuse(400, "BadRequest", detail)
        if req.header("x-wns-match") is not None:
            raise _refuse(400, "BadRequest", "X-WNS-Match belongs to DELETE requests")
        wns_type = req.header("x-wns-type")
        if wns_type not in CONTENT_TYPES:
            detail = f"X-WNS-Type must be one of {sorted(CONTENT_TYPES)}, not {wns_type!r}"
            raise _refuse(400, "BadRequest", detail)
        content_type = _media_type(req.header("content-type"))
        if content_type != CONTENT_TYPES[wns_type]:
            detail = (
                f"{wns_type} needs Content-Type {CONTENT_TYPES[wns_type]}, not {content_type!r}"
            )
            raise _refuse(400, "BadRequest", detail)
        options = self._headers(req)
        if len(req.body) > MAX_PAYLOAD:
            detail = f"The notification payload ({len(req.body)} bytes) exceeds 5000 bytes"
            raise _refuse(413, "RequestEntityTooLarge", detail)
        if not req.body:
            raise _refuse(400, "BadRequest", "the notification has no payload")
        details: dict[str, Any] = {"type": wns_type, **options}
        if wns_type == "wns/raw":
            payload, message = self._raw(req.body)
        else:
            payload, message = self._xml(req.body, wns_type, details)
        delivery = Delivery(
            provider=self.provider,
            target=target,
            kind=wns_type,
            id=_msg_id(),
            payload=payload,
            message=message,
            headers=req.header_map(),
            details=details,
            http_version=req.http_version,
        )
        self.journal.accept(delivery)
        return self._ok(req, delivery.id, options)

    def _raw(self, body: bytes) -> tuple[Any, Any]:
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            return body, None
        try:
            payload = json.loads(text)
        except ValueError:
            return text, None
        return payload, payload if isinstance(payload, dict) else None

    def _xml(self, body: bytes, wns_type: str, details: dict[str, Any]) -> tuple[Any, Any]:
        # WNS itself hands the XML to the device, which drops what it cannot show without a
        # word; the stand-in refuses it instead (400), or the error would go unseen.
        try:
            root = ET.fromstring(body)
        except ET.ParseError as e:
            raise _refuse(400, "BadRequest", f"the payload is not well-formed XML: {e}") from e
        expected = XML_ROOTS[wns_type]
        if root.tag != expected:
            detail = f"a {wns_type} payload's root is <{expected}>, not <{root.tag}>"
            raise _refuse(400, "BadRequest", detail)
        details["xml"] = body.decode("utf-8", "replace")
        if wns_type != "wns/toast":
            return details["xml"], None
        binding = root.find("visual/binding")
        if binding is None or binding.get("template") != "ToastGeneric":
            detail = 'a toast needs <visual><binding template="ToastGeneric">'
            raise _refuse(400, "BadRequest", detail)
        texts = [t.text or "" for t in binding.findall("text")]
        if not texts:
            raise _refuse(400, "BadRequest", "a toast binding needs <text> elements")
        launch = root.get("launch")
        message: Any = None
        if launch is not None:
            try:
                message = json.loads(launch)
            except ValueError:
                message = None
        details.update(
            title=texts[0],
            body=texts[1] if len(texts) > 1 else None,
            texts=texts,
            launch=launch,
        )
        payload = {"title": texts[0], "texts": texts, "launch": launch, "xml": details["xml"]}
        return payload, message

    def _delete(self, req: Request, target: str) -> Response:
        match = req.header("x-wns-match")
        if match is None:
            raise _refuse(400, "BadRequest", "DELETE needs X-WNS-Match")
        parts = match.strip().split(";")
        if parts[0].strip().lower() != "type:wns/toast" or len(parts) < 2:
            detail = f"X-WNS-Match must be type:wns/toast;..., not {match!r}"
            raise _refuse(400, "BadRequest", detail)
        spec: dict[str, Any] = {"all": False, "group": None, "tag": None}
        rest = [p.strip() for p in parts[1:]]
        if rest == ["all"]:
            spec["all"] = True
        else:
            for part in rest:
                name, eq, value = part.partition("=")
                if not eq or name not in ("group", "tag") or spec[name] is not None:
                    raise _refuse(400, "BadRequest", f"X-WNS-Match {match!r}")
                if not LABEL.fullmatch(value):
                    raise _refuse(400, "BadRequest", f"X-WNS-Match {name} {value!r}")
                spec[name] = value
        delivery = Delivery(
            provider=self.provider,
            target=target,
            kind="delete",
            id=_msg_id(),
            payload=spec,
            message=None,
            headers=req.header_map(),
            details={"match": spec, "ignored_body": len(req.body)},
            method="DELETE",
            http_version=req.http_version,
        )
        self.journal.accept(delivery)
        return self._ok(req, delivery.id, {})

    def _ok(self, req: Request, msg_id: str, options: dict[str, Any]) -> Response:
        headers = [
            ("x-wns-status", "received"),
            ("x-wns-msg-id", msg_id),
            ("x-wns-debug-trace", "STANDIN"),
            ("ms-cv", req.header("ms-cv") or secrets.token_urlsafe(16) + ".0"),
        ]
        if options.get("request_for_status"):
            headers.append(("x-wns-deviceconnectionstatus", "connected"))
        return Response(200, b"", headers)
