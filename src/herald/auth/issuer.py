"""Herald's embedded OAuth issuer: one signing key kept with the data, and a token minter.

It lets a single machine run with no external IdP: the client-credentials endpoint
(`api/token.py`) mints app-only tokens for registered apps, and the CLI mints delegated user tokens
for development. Tokens look like Entra ID v2 access tokens (`scp`/`roles`, `oid`, `azp`, `appid`,
`idtyp`) so the same verifier code path serves both.

Algorithm: RS256 with a 2048-bit key. Measured with joserfc 1.8 / cryptography 50 on the 2-core
reference machine, verification (the cost paid on every request that misses the token cache)
takes ~39 us for RS256 against ~100 us for ES256 (PyJWT: 59 vs 119 us). Signing is slower for RSA
(~290 us vs ~85 us) but happens once per token, not once per request, and RS256 is the algorithm
every IdP and JWT library supports.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import secrets
import time
import uuid
from collections.abc import Iterable
from typing import Any

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import RSAKey

log = logging.getLogger(__name__)

# The one permission Herald's API grants (this issuer's tokens carry it) and requires
# (`tokens.require_permission`): Graph's name for it.
SCOPE = "Notifications.ReadWrite.CreatedByApp"

KEY_FILE = "issuer-key.json"
ALGORITHM = "RS256"
_KEY_BITS = 2048


class LocalIssuer:
    """Mints tokens signed with Herald's own key; `jwks()` publishes the public half."""

    def __init__(self, key: RSAKey, *, issuer_url: str, audience: str) -> None:
        self.issuer = issuer_url
        self.audience = audience
        self.use(key)

    def use(self, key: RSAKey) -> None:
        """Sign with `key` from now on (a cluster's shared key, adopted at start; the verifier
        follows, `TokenVerifier`)."""
        if not key.is_private:
            raise ValueError("the issuer needs a private key")
        self.key = key
        self.kid: str = key.kid or key.thumbprint()
        self._public = RSAKey.import_key(self._public_dict())

    def private_bytes(self) -> bytes:
        """The key as stored (a private JWK): `import_key` reads it back."""
        return _private_bytes(self.key)

    @classmethod
    def load_or_create(cls, data_dir: pathlib.Path, issuer_url: str, audience: str) -> LocalIssuer:
        """Load `data_dir/issuer-key.json`, generating it on first start."""
        data_dir.mkdir(parents=True, exist_ok=True)
        path = data_dir / KEY_FILE
        if not path.exists():
            _create_key_file(path)
        return cls(_load_key(path), issuer_url=issuer_url, audience=audience)

    @property
    def public_key(self) -> RSAKey:
        """The verification key (no private parts)."""
        return self._public

    def jwks(self) -> dict[str, Any]:
        """The JWK Set to publish: public keys only."""
        return {"keys": [self._public_dict()]}

    def mint(
        self,
        *,
        client_id: str,
        user_id: str | None,
        ttl_seconds: int = 3600,
        scopes: Iterable[str] = (SCOPE,),
        roles: Iterable[str] | None = None,
    ) -> str:
        """A signed access token: delegated when `user_id` is set, app-only when it is None.

        `roles` defaults to the permission for app-only tokens (what a client-credentials grant
        yields) and to none for delegated ones; pass `roles=()` for an app-only token without it.
        """
        if ttl_seconds <= 0:
            raise ValueError("ttl_seconds must be positive")
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "iat": now,
            "nbf": now,
            "exp": now + ttl_seconds,
            "jti": str(uuid.uuid4()),
            "azp": client_id,
            "appid": client_id,
            "ver": "2.0",
        }
        if user_id is None:
            # Entra-style app-only token: roles + idtyp; `sub` is the client (RFC 9068 §2.2).
            role_list = [SCOPE] if roles is None else list(roles)
            claims.update(roles=role_list, idtyp="app", sub=client_id)
        else:
            claims.update(scp=" ".join(scopes), oid=user_id, sub=user_id)
            delegated_roles = list(roles or ())
            if delegated_roles:
                claims["roles"] = delegated_roles
        header = {"alg": ALGORITHM, "typ": "JWT", "kid": self.kid}
        return jwt.encode(header, claims, self.key, algorithms=[ALGORITHM])

    def _public_dict(self) -> dict[str, Any]:
        return dict(self.key.as_dict(private=False, kid=self.kid, alg=ALGORITHM, use="sig"))


def _create_key_file(path: pathlib.Path) -> None:
    """Write a new key so that, of several processes starting at once, the first writer wins.

    The key is written in full to a private temporary file and then hard-linked to its final name:
    `os.link` fails if the name exists, so the file appears atomically, complete, and only once.
    A loser discards its own key and loads the winner's. (`os.replace` would be last-writer-wins,
    so two processes could each keep signing with a key the other has overwritten.)
    """
    key = RSAKey.generate_key(_KEY_BITS, auto_kid=True)
    body = _private_bytes(key)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
            log.info("generated issuer signing key %s in %s", key.kid, path)
        except FileExistsError:
            log.info("issuer key %s was created concurrently; using it", path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _private_bytes(key: RSAKey) -> bytes:
    return json.dumps(dict(key.as_dict(private=True, alg=ALGORITHM, use="sig"))).encode()


def import_key(data: bytes) -> RSAKey:
    """A key `private_bytes` wrote (a stored one: do not guess at a damaged one, which would
    invalidate every token already issued)."""
    try:
        return RSAKey.import_key(json.loads(data))
    except (ValueError, TypeError, JoseError) as exc:
        raise RuntimeError(f"cannot read the stored issuer signing key: {exc}") from exc


def _load_key(path: pathlib.Path) -> RSAKey:
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        log.warning("issuer key %s is readable by others (mode %o); chmod 600 it", path, mode)
    try:
        return RSAKey.import_key(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, TypeError, JoseError) as exc:
        # Do not guess: replacing it would invalidate every token already issued.
        raise RuntimeError(f"cannot read the issuer signing key {path}: {exc}") from exc


def _fsync_dir(directory: pathlib.Path) -> None:
    # Make the new directory entry durable: a key the server signed with must survive a crash.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
