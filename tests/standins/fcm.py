"""FCM HTTP v1 stand-in, with the Google OAuth 2.0 token endpoint (JWT bearer flow) it needs.

`service_account()` is the JSON Herald is configured with (its token_uri points here);
`new_token()` registers an app instance's registration token.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

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
from tests.standins.jws import Jwt, JwtError
from tests.standins.tls import TlsFiles

TOKEN_PATH = "/token"
SEND_PATH = re.compile(r"/v1/projects/([^/]+)/messages:send")
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
MESSAGING_SCOPES = (
    "https://www.googleapis.com/auth/firebase.messaging",
    "https://www.googleapis.com/auth/cloud-platform",
)
# The aud Google takes for its token endpoint (google-auth always sends the first, whatever the
# token_uri); the stand-in's own token URL is taken too.
GOOGLE_TOKEN_AUDIENCES = (
    "https://oauth2.googleapis.com/token",
    "https://www.googleapis.com/oauth2/v4/token",
    "https://accounts.google.com/o/oauth2/token",
)
MAX_ASSERTION_LIFETIME = 3600
CLOCK_SKEW = 300
MAX_SIZE = 4096  # data + notification, keys and values
MAX_TTL = 28 * 24 * 3600
DURATION = re.compile(r"-?[0-9]+(?:\.[0-9]{1,9})?s")
FCM_ERROR = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"
STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}
ERROR_CODES = {  # FcmError.errorCode by HTTP status
    400: "INVALID_ARGUMENT",
    401: "THIRD_PARTY_AUTH_ERROR",
    403: "SENDER_ID_MISMATCH",
    404: "UNREGISTERED",
    429: "QUOTA_EXCEEDED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}
MESSAGES = {
    "INVALID_ARGUMENT": "Request contains an invalid argument.",
    "UNREGISTERED": "Requested entity was not found.",
    "SENDER_ID_MISMATCH": "SenderId mismatch",
    "QUOTA_EXCEEDED": "Quota exceeded for quota metric 'Messages sent'.",
    "UNAVAILABLE": "The service is currently unavailable.",
    "INTERNAL": "Internal error encountered.",
    "THIRD_PARTY_AUTH_ERROR": "Auth error from APNS or Web Push Service",
}
UNAUTHENTICATED = (
    "Request had invalid authentication credentials. Expected OAuth 2 access token, login "
    "cookie or other valid authentication credential. See "
    "https://developers.google.com/identity/sign-in/web/devconsole-project."
)

# Message fields (proto names; JSON may also use lowerCamelCase): name -> kind.
MESSAGE_FIELDS = {
    "name": "string",
    "data": "map",
    "notification": "object",
    "android": "object",
    "webpush": "object",
    "apns": "object",
    "fcm_options": "object",
    "token": "string",
    "topic": "string",
    "condition": "string",
}
NOTIFICATION_FIELDS = {"title": "string", "body": "string", "image": "string"}
ANDROID_FIELDS = {
    "collapse_key": "string",
    "priority": "enum",
    "ttl": "duration",
    "restricted_package_name": "string",
    "data": "map",
    "notification": "object",
    "fcm_options": "object",
    "direct_boot_ok": "bool",
    "bandwidth_constrained_ok": "bool",
    "restricted_satellite_ok": "bool",
}
ANDROID_NOTIFICATION_FIELDS = {
    "title": "string",
    "body": "string",
    "icon": "string",
    "color": "string",
    "sound": "string",
    "tag": "string",
    "click_action": "string",
    "body_loc_key": "string",
    "body_loc_args": "strings",
    "title_loc_key": "string",
    "title_loc_args": "strings",
    "channel_id": "string",
    "ticker": "string",
    "sticky": "bool",
    "event_time": "string",
    "local_only": "bool",
    "notification_priority": "string",
    "default_sound": "bool",
    "default_vibrate_timings": "bool",
    "default_light_settings": "bool",
    "vibrate_timings": "strings",
    "visibility": "string",
    "notification_count": "int",
    "light_settings": "object",
    "image": "string",
    "bypass_proxy_notification": "bool",
    "proxy": "string",
}
RESERVED_DATA_KEYS = ("from", "message_type")
RESERVED_DATA_PREFIXES = ("google", "gcm")


@dataclass(frozen=True)
class ServiceAccount:
    project_id: str
    client_email: str
    private_key_id: str
    public_key: rsa.RSAPublicKey


@dataclass
class AccessToken:
    token: str
    client_email: str
    project_id: str
    scopes: tuple[str, ...]
    expires: float


def _google_error(
    status: int,
    message: str,
    *,
    error_code: str | None = None,
    field: str | None = None,
    headers: list[tuple[str, str]] | None = None,
) -> Response:
    details: list[dict[str, Any]] = []
    if error_code is not None:
        details.append({"@type": FCM_ERROR, "errorCode": error_code})
    if field is not None:
        details.append(
            {"@type": BAD_REQUEST, "fieldViolations": [{"field": field, "description": message}]}
        )
    error: dict[str, Any] = {"code": status, "message": message, "status": STATUS[status]}
    if details:
        error["details"] = details
    return Response.json(status, {"error": error}, headers or [])


def _invalid(message: str, field: str | None = None, code: str | None = None) -> Refused:
    """400 INVALID_ARGUMENT, with a BadRequest field violation (and/or an FcmError code)."""
    if field is None and code is None:
        code = "INVALID_ARGUMENT"
    return Refused(
        _google_error(400, message, error_code=code, field=field), "INVALID_ARGUMENT", message
    )


def _oauth_error(error: str, description: str) -> Refused:
    body = {"error": error, "error_description": description}
    return Refused(Response.json(400, body), error, description)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.capitalize() for p in rest)


def _fields(value: Any, allowed: dict[str, str], path: str) -> dict[str, Any]:
    """A proto JSON object, keys normalised to the proto (snake_case) names; unknown names,
    both spellings of one field and wrongly typed values are INVALID_ARGUMENT, as at Google."""
    if not isinstance(value, dict):
        raise _invalid(f"Invalid value at '{path}': must be an object.", path)
    by_json = {n: n for n in allowed} | {_camel(n): n for n in allowed}
    out: dict[str, Any] = {}
    for key, v in value.items():
        name = by_json.get(key)
        if name is None:
            msg = (
                f"Invalid JSON payload received. Unknown name \"{key}\" at '{path}': "
                "Cannot find field."
            )
            raise _invalid(msg, path)
        if name in out:
            raise _invalid(
                f"Invalid JSON payload received. Duplicate field \"{key}\" at '{path}'.", path
            )
        _check_kind(v, allowed[name], f"{path}.{name}")
        out[name] = v
    return out


def _check_kind(value: Any, kind: str, path: str) -> None:
    ok = {
        "string": isinstance(value, str),
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "strings": isinstance(value, list) and all(isinstance(s, str) for s in value),
        "object": isinstance(value, dict),
        "map": isinstance(value, dict),
        "enum": isinstance(value, str),
        "duration": isinstance(value, str),
    }[kind]
    if not ok:
        raise _invalid(f"Invalid value at '{path}' ({kind}), {json.dumps(value)}", path)


def _string_map(value: dict[str, Any], path: str) -> dict[str, str]:
    for i, (k, v) in enumerate(value.items()):
        if not isinstance(v, str):
            msg = f"Invalid value at '{path}[{i}].value' (TYPE_STRING), {json.dumps(v)}"
            raise _invalid(msg, f"{path}[{i}].value")
        if k in RESERVED_DATA_KEYS or k.startswith(RESERVED_DATA_PREFIXES):
            raise _invalid(f"Invalid data key {k!r}: it is reserved.", path, "INVALID_ARGUMENT")
    return value


def _size(*maps: dict[str, Any] | None) -> int:
    total = 0
    for m in maps:
        for k, v in (m or {}).items():
            if isinstance(v, str):
                total += len(k.encode()) + len(v.encode())
    return total


class FcmStandIn(StandIn):
    """fcm.googleapis.com (POST /v1/projects/<id>/messages:send) and oauth2.googleapis.com
    (POST /token) for `project_id`. `token_lifetime` is the access tokens' expires_in."""

    provider = "fcm"

    def __init__(
        self,
        tls: TlsFiles,
        *,
        project_id: str = "herald-test",
        token_lifetime: int = 3599,
        host: str = "127.0.0.1",
        port: int = 0,
        keep: int | None = None,
    ) -> None:
        super().__init__(tls, host=host, port=port, keep=keep)
        self.project_id = project_id
        self.token_lifetime = token_lifetime
        self._lock = threading.Lock()
        self._accounts: dict[str, ServiceAccount] = {}  # client_email -> account
        self._access: dict[str, AccessToken] = {}
        self._registrations: dict[str, str] = {}  # registration token -> project
        self._default: dict[str, Any] | None = None

    # -- credentials and registrations

    @property
    def token_uri(self) -> str:
        return f"{self.url}{TOKEN_PATH}"

    def service_account(self, project_id: str | None = None) -> dict[str, Any]:
        """A service-account key JSON (as the Firebase console downloads it) for `project_id`
        (default: this project), trusted by the token endpoint. Without arguments, always the
        same one."""
        if project_id is None and self._default is not None:
            return dict(self._default)
        project = project_id or self.project_id
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        key_id = secrets.token_hex(20)
        name = f"firebase-adminsdk-{secrets.token_hex(3)}"
        email = f"{name}@{project}.iam.gserviceaccount.com"
        client_id = str(secrets.randbelow(10**21))
        with self._lock:
            self._accounts[email] = ServiceAccount(project, email, key_id, key.public_key())
        info = {
            "type": "service_account",
            "project_id": project,
            "private_key_id": key_id,
            "private_key": key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ).decode("ascii"),
            "client_email": email,
            "client_id": client_id,
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": self.token_uri,
            "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
            "client_x509_cert_url": f"https://www.googleapis.com/robot/v1/metadata/x509/{email}",
            "universe_domain": "googleapis.com",
        }
        if project_id is None:
            self._default = info
        return dict(info)

    def write_service_account(self, directory: Path | str) -> Path:
        path = Path(directory) / "fcm-service-account.json"
        path.write_text(json.dumps(self.service_account(), indent=2))
        path.chmod(0o600)
        return path

    def delete_service_account(self, client_email: str) -> None:
        """The account's assertions are refused (invalid_grant) and its tokens stop working."""
        with self._lock:
            self._accounts.pop(client_email, None)
            for t in self._access.values():
                if t.client_email == client_email:
                    t.expires = 0

    def new_token(self, project_id: str | None = None) -> str:
        """A registration token of an app instance of `project_id` (default: this project;
        another project's token is SENDER_ID_MISMATCH here)."""
        token = f"{secrets.token_urlsafe(16)}:APA91b{secrets.token_urlsafe(105)}"
        with self._lock:
            self._registrations[token] = project_id or self.project_id
        return token

    def expire_tokens(self) -> None:
        """Every access token issued so far is expired from now on (requests: 401)."""
        with self._lock:
            for t in self._access.values():
                t.expires = 0

    def revoke_token(self, access_token: str) -> None:
        with self._lock:
            self._access.pop(access_token, None)

    def create(self, **options: Any) -> Any:
        return self.new_token(options.get("project_id"))

    def info(self) -> dict[str, Any]:
        info = super().info()
        info.update(project_id=self.project_id, token_uri=self.token_uri)
        return info

    def write_credentials(self, directory: Path) -> dict[str, Any]:
        return {"service_account_file": str(self.write_service_account(directory))}

    def control_extra(self, name: str, body: dict[str, Any]) -> Response | None:
        if name == "expire-tokens":
            self.expire_tokens()
            return Response.json(200, {"ok": True})
        return None

    # -- the service

    def route(self, req: Request) -> tuple[str, str | None]:
        if req.path == TOKEN_PATH:
            return TOKEN, None
        target = None
        if SEND_PATH.fullmatch(req.path) and req.body:
            try:  # the registration token, for per-device faults; the handler checks it all
                message = json.loads(req.body).get("message")
                target = message.get("token") if isinstance(message, dict) else None
            except (ValueError, AttributeError):
                pass
        return SEND, target if isinstance(target, str) else None

    def gone_refusal(self, target: str, status: int | None) -> Refused:
        return Refused(
            _google_error(status or 404, MESSAGES["UNREGISTERED"], error_code="UNREGISTERED"),
            "UNREGISTERED",
            "the registration token is no longer valid",
        )

    def fault_response(self, fault: Fault, on: str, target: str | None) -> Response:
        headers = list(fault.headers.items())
        if on == TOKEN:
            error = fault.reason or ("invalid_grant" if fault.status < 500 else "internal_failure")
            return Response.json(fault.status, {"error": error}, headers)
        if fault.status == 401 and fault.reason in (None, "UNAUTHENTICATED"):
            return _google_error(401, UNAUTHENTICATED, headers=headers)
        code = fault.reason or ERROR_CODES.get(fault.status, "UNSPECIFIED_ERROR")
        status = fault.status if fault.status in STATUS else 500
        response = _google_error(status, MESSAGES.get(code, code), error_code=code, headers=headers)
        response.status = fault.status
        return response

    async def handle(self, req: Request, on: str, target: str | None) -> Response:
        if on == TOKEN:
            return self._token(req)
        match = SEND_PATH.fullmatch(req.path)
        if match is None:
            raise Refused(_google_error(404, "Not Found"), "NOT_FOUND", f"no {req.path}")
        if req.method != "POST":
            raise Refused(_google_error(404, "Not Found"), "NOT_FOUND", f"{req.method}")
        access = self._authorize(req, match.group(1))
        return self._send(req, access, match.group(1))

    # -- OAuth 2.0

    def _token(self, req: Request) -> Response:
        if req.method != "POST":
            raise Refused(Response(405), "MethodNotAllowed", req.method)
        ctype = (req.header("content-type") or "").split(";")[0].strip().lower()
        if ctype != "application/x-www-form-urlencoded":
            raise _oauth_error("invalid_request", f"unsupported content type {ctype!r}")
        try:
            form = parse_qs(req.body.decode("ascii"), strict_parsing=True)
        except (UnicodeDecodeError, ValueError) as e:
            raise _oauth_error("invalid_request", f"malformed form: {e}") from e
        grant = form.get("grant_type", [""])[0]
        if grant != JWT_BEARER:
            raise _oauth_error("unsupported_grant_type", f"Invalid grant_type: {grant}")
        assertion = form.get("assertion", [""])[0]
        try:
            jwt = Jwt.parse(assertion)
        except JwtError as e:
            raise _oauth_error("invalid_grant", f"Invalid JWT: {e}") from e
        iss = jwt.claims.get("iss")
        with self._lock:
            account = self._accounts.get(iss) if isinstance(iss, str) else None
        if account is None:
            raise _oauth_error("invalid_grant", "Invalid grant: account not found")
        kid = jwt.header.get("kid")
        if kid is not None and kid != account.private_key_id:
            raise _oauth_error("invalid_grant", "Invalid JWT Signature.")
        try:
            jwt.verify_rs256(account.public_key)
        except JwtError as e:
            raise _oauth_error("invalid_grant", "Invalid JWT Signature.") from e
        if jwt.claims.get("aud") not in (self.token_uri, *GOOGLE_TOKEN_AUDIENCES):
            detail = f"Invalid JWT: aud must be {self.token_uri!r} or Google's token endpoint"
            raise _oauth_error("invalid_grant", detail)
        now = time.time()
        try:
            iat, exp = jwt.int_claim("iat"), jwt.int_claim("exp")
        except JwtError as e:
            raise _oauth_error("invalid_grant", f"Invalid JWT: {e}") from e
        if not (
            iat <= now + CLOCK_SKEW
            and exp > now - CLOCK_SKEW
            and 0 < exp - iat <= MAX_ASSERTION_LIFETIME
        ):
            detail = (
                "Invalid JWT: Token must be a short-lived token (60 minutes) and in a "
                "reasonable timeframe. Check your iat and exp values in the JWT claim."
            )
            raise _oauth_error("invalid_grant", detail)
        scope = jwt.claims.get("scope")
        if not isinstance(scope, str) or not scope.split():
            detail = "Invalid OAuth scope or ID token audience provided."
            raise _oauth_error("invalid_scope", detail)
        token = AccessToken(
            token=f"ya29.{secrets.token_urlsafe(96)}",
            client_email=account.client_email,
            project_id=account.project_id,
            scopes=tuple(scope.split()),
            expires=now + self.token_lifetime,
        )
        with self._lock:
            self._access[token.token] = token
        self.journal.count("tokens_issued")
        body = {
            "access_token": token.token,
            "expires_in": self.token_lifetime,
            "token_type": "Bearer",
        }
        return Response.json(200, body, [("cache-control", "no-cache, no-store, max-age=0")])

    def _authorize(self, req: Request, project: str) -> AccessToken:
        auth = req.header("authorization") or ""
        scheme, _, value = auth.strip().partition(" ")
        with self._lock:
            token = self._access.get(value.strip()) if scheme.lower() == "bearer" else None
        if token is None or token.expires <= time.time():
            www = 'Bearer realm="https://accounts.google.com/", error="invalid_token"'
            raise Refused(
                _google_error(401, UNAUTHENTICATED, headers=[("www-authenticate", www)]),
                "UNAUTHENTICATED",
                "no access token" if not auth else "unknown or expired access token",
            )
        if not set(token.scopes) & set(MESSAGING_SCOPES):
            raise Refused(
                _google_error(403, "Request had insufficient authentication scopes."),
                "ACCESS_TOKEN_SCOPE_INSUFFICIENT",
                f"the token's scopes {token.scopes} do not include firebase.messaging",
            )
        if token.project_id != project:
            msg = (
                "Permission 'cloudmessaging.messages.create' denied on resource "
                f"'//cloudresourcemanager.googleapis.com/projects/{project}' "
                "(or it may not exist)."
            )
            raise Refused(_google_error(403, msg), "PERMISSION_DENIED", msg)
        return token

    # -- messages:send

    def _send(self, req: Request, access: AccessToken, project: str) -> Response:
        try:
            body = json.loads(req.body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise _invalid(f"Invalid JSON payload received. {e}") from e
        if not isinstance(body, dict):
            raise _invalid("Invalid JSON payload received. Expected an object.")
        top = _fields(body, {"message": "object", "validate_only": "bool"}, "")
        if "message" not in top:
            raise _invalid("Request contains an invalid argument.", "message")
        message = _fields(top["message"], MESSAGE_FIELDS, "message")
        targets = [t for t in ("token", "topic", "condition") if t in message]
        if len(targets) != 1:
            raise _invalid("Exactly one of token, topic or condition must be set.", "message")
        if targets[0] != "token":
            raise _invalid("The stand-in only takes messages to a registration token.", "message")

        data = _string_map(message.get("data", {}), "message.data")
        notification = None
        if "notification" in message:
            notification = _fields(
                message["notification"], NOTIFICATION_FIELDS, "message.notification"
            )
        android = self._android(message.get("android"))
        android_notification = android.get("notification")
        size = _size(data, android.get("data"), notification, android_notification)
        if size > MAX_SIZE:
            raise _invalid(
                f"Message is too big: {size} bytes of data and notification (at most {MAX_SIZE}).",
                "message",
            )
        token = message["token"]
        with self._lock:
            registered = self._registrations.get(token)
        if registered is None:
            raise _invalid(
                "The registration token is not a valid FCM registration token",
                code="INVALID_ARGUMENT",
            )
        if registered != project:
            raise Refused(
                _google_error(403, MESSAGES["SENDER_ID_MISMATCH"], error_code="SENDER_ID_MISMATCH"),
                "SENDER_ID_MISMATCH",
                f"the token belongs to project {registered!r}",
            )
        self.check_gone(token)
        message_id = f"0:{int(time.time() * 1e6)}%{secrets.token_hex(8)}"
        if top.get("validate_only"):
            self.journal.count("validated")
            return Response.json(200, {"name": f"projects/{project}/messages/fake_message_id"})
        visual = notification is not None or android_notification is not None
        delivery = Delivery(
            provider=self.provider,
            target=token,
            kind="notification" if visual else "data",
            id=message_id,
            payload=message,
            message=data,
            headers=req.header_map(),
            details={
                "notification": notification,
                "android": android,
                "priority": android.get("priority"),
                "ttl": android.get("ttl"),
                "collapse_key": android.get("collapse_key"),
                "tag": (android_notification or {}).get("tag"),
                "size": size,
            },
            http_version=req.http_version,
        )
        self.journal.accept(delivery)
        return Response.json(200, {"name": f"projects/{project}/messages/{message_id}"})

    def _android(self, value: Any) -> dict[str, Any]:
        if value is None:
            return {}
        android = _fields(value, ANDROID_FIELDS, "message.android")
        priority = android.get("priority")
        if priority is not None and priority not in ("NORMAL", "HIGH"):
            msg = (
                "Invalid value at 'message.android.priority' "
                f"(type.googleapis.com/google.firebase.fcm.v1.AndroidMessagePriority), {priority!r}"
            )
            raise _invalid(msg, "message.android.priority")
        ttl = android.get("ttl")
        if ttl is not None:
            if not DURATION.fullmatch(ttl):
                msg = (
                    "Invalid value at 'message.android.ttl' "
                    f"(type.googleapis.com/google.protobuf.Duration), {ttl!r}"
                )
                raise _invalid(msg, "message.android.ttl")
            seconds = float(ttl[:-1])
            if seconds < 0 or seconds > MAX_TTL:
                msg = f"TTL must be between 0s and {MAX_TTL}s, not {ttl}"
                raise _invalid(msg, "message.android.ttl")
        if "data" in android:
            _string_map(android["data"], "message.android.data")
        if "notification" in android:
            android["notification"] = _fields(
                android["notification"],
                ANDROID_NOTIFICATION_FIELDS,
                "message.android.notification",
            )
        return android
