"""Client credentials of registered apps: ids, secrets and how secrets are stored.

A secret is shown once, when the app is registered; only its salted scrypt hash is kept. The hash
string describes its own parameters (``scrypt$n=16384,r=8,p=1$<salt>$<hash>``) so the cost can be
raised later without invalidating the secrets already issued.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import uuid

_SCHEME = "scrypt"
# scrypt N=2^14, r=8, p=1 costs ~60 ms and 16 MiB on the 2-core reference machine. Secrets are
# 256-bit random strings, so the KDF is defence in depth for a leaked database, not what stops
# guessing; the cost stays moderate because the token endpoint pays it on every token request.
_N = 2**14
_R = 8
_P = 1
_SALT_BYTES = 16
_KEY_BYTES = 32
# Parameters come from the stored string: cap them so a corrupted or hostile row cannot make
# one verification allocate gigabytes.
_MAX_N = 2**20
_MAX_R = 32
_MAX_P = 16
_MAXMEM = 256 * 1024 * 1024


def new_client_id() -> str:
    """A new client id: a random GUID, as Entra ID uses for application (client) ids."""
    return str(uuid.uuid4())


def new_client_secret() -> str:
    """A new client secret: 32 random bytes (256 bits), URL-safe base64 without padding."""
    return secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    """Salted scrypt hash of `secret`, as a self-describing string."""
    salt = secrets.token_bytes(_SALT_BYTES)
    digest = _scrypt(secret, salt, _N, _R, _P, _KEY_BYTES)
    return f"{_SCHEME}$n={_N},r={_R},p={_P}${_b64(salt)}${_b64(digest)}"


def verify_secret(secret: str, hashed: str) -> bool:
    """True when `secret` matches `hashed`. Malformed or unknown hash strings never match."""
    parsed = _parse(hashed)
    if parsed is None:
        return False
    n, r, p, salt, expected = parsed
    actual = _scrypt(secret, salt, n, r, p, len(expected))
    return hmac.compare_digest(actual, expected)


def _scrypt(secret: str, salt: bytes, n: int, r: int, p: int, dklen: int) -> bytes:
    return hashlib.scrypt(
        secret.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=_MAXMEM, dklen=dklen
    )


def _parse(hashed: str) -> tuple[int, int, int, bytes, bytes] | None:
    parts = hashed.split("$")
    if len(parts) != 4 or parts[0] != _SCHEME:
        return None
    try:
        params = dict(item.split("=", 1) for item in parts[1].split(","))
        n, r, p = int(params["n"]), int(params["r"]), int(params["p"])
        salt, expected = _unb64(parts[2]), _unb64(parts[3])
    except (KeyError, ValueError, binascii.Error):
        return None
    if not (1 < n <= _MAX_N and n & (n - 1) == 0 and 0 < r <= _MAX_R and 0 < p <= _MAX_P):
        return None
    if not salt or not 16 <= len(expected) <= 64:
        return None
    return n, r, p, salt, expected


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
