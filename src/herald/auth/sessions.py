"""Web sessions of the embedded issuer: sign-in codes and refresh tokens (docs/inbox.md).

A person opens the web inbox through a sign-in link that the operator's CLI prints
(`herald signin`). The link's code is exchanged once for an access token and a refresh token; the
refresh token renews the access token until the session ends (`session_ttl` after sign-in).

Both are JWTs signed with the issuer's key, each with an audience of its own, so neither passes as
an access token (whose audience is Herald's) nor as the other. They are stateless, so a refresh
token cannot be revoked before its session ends except by rotating the issuer's key. Codes are
single-use: a redeemed code's id is recorded in the store until the code expires
(`Redemptions`, the store's `Issuance`), so a code works once across restarts and across the
nodes of a cluster.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from joserfc import jwt
from joserfc.errors import JoseError

from herald.auth.issuer import ALGORITHM, LocalIssuer

SIGNIN_GRANT = "urn:herald:params:oauth:grant-type:signin-code"
SIGNIN_AUDIENCE = "urn:herald:signin"
REFRESH_AUDIENCE = "urn:herald:refresh"
SIGNIN_TTL = 600
# Their own JWT types too (RFC 8725 §3.11), for relying parties that ignore the audience.
_TYPES = {SIGNIN_AUDIENCE: "herald-signin+jwt", REFRESH_AUDIENCE: "herald-refresh+jwt"}


class InvalidGrant(Exception):
    """The code or refresh token cannot be used (RFC 6749 §5.2 `invalid_grant`)."""


@dataclass(frozen=True)
class Grant:
    """Who signed in, through which app, and when the session ends (Unix time)."""

    client_id: str
    user_id: str
    session_end: int


class Redemptions(Protocol):
    """Where redeemed codes are recorded (the store: `herald.store.Issuance.redeem_code`)."""

    async def redeem_code(self, code_id: str, expires: datetime, now: datetime) -> bool:
        """Record the code as redeemed until `expires`; False if it already was."""


class MemoryRedemptions:
    """Redeemed codes in this process's memory: for a `Sessions` that only mints (the CLI)."""

    def __init__(self) -> None:
        self.used: dict[str, datetime] = {}  # redeemed code id -> its expiry

    async def redeem_code(self, code_id: str, expires: datetime, now: datetime) -> bool:
        self.used = {k: v for k, v in self.used.items() if v > now}
        if code_id in self.used:
            return False
        self.used[code_id] = expires
        return True


class Sessions:
    """Mints and redeems sign-in codes and refresh tokens with the embedded issuer's key."""

    def __init__(
        self,
        issuer: LocalIssuer,
        codes: Redemptions | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.issuer = issuer
        self.codes = codes or MemoryRedemptions()
        self.clock = clock

    def signin_code(self, client_id: str, user_id: str, ttl: int = SIGNIN_TTL) -> str:
        """A single-use code that signs `user_id` in to the app `client_id` within `ttl` s."""
        return self._mint(SIGNIN_AUDIENCE, client_id, user_id, int(self.clock()) + ttl)

    def refresh_token(self, grant: Grant) -> str:
        """A refresh token of the session `grant`; it expires when the session ends."""
        return self._mint(REFRESH_AUDIENCE, grant.client_id, grant.user_id, grant.session_end)

    async def redeem(self, code: str, client_id: str, session_ttl: int) -> Grant:
        """The session a sign-in code starts; the code cannot be redeemed again, on any node."""
        claims = self._verify(code, SIGNIN_AUDIENCE, client_id, "sign-in code")
        jti, exp = str(claims.get("jti", "")), int(claims["exp"])
        now = self.clock()
        if not jti:
            raise InvalidGrant("The sign-in code is not valid.")
        # Kept a little past the code's expiry: a clock behind by that much still finds it.
        expires = datetime.fromtimestamp(exp + 60, UTC)
        if not await self.codes.redeem_code(jti, expires, datetime.fromtimestamp(int(now), UTC)):
            raise InvalidGrant("The sign-in code has already been used.")
        # Rounded up: the session lasts at least `session_ttl` (token times are whole seconds).
        return Grant(client_id, str(claims["sub"]), math.ceil(now) + session_ttl)

    def refresh(self, token: str, client_id: str) -> Grant:
        """The session a refresh token belongs to."""
        claims = self._verify(token, REFRESH_AUDIENCE, client_id, "refresh token")
        return Grant(client_id, str(claims["sub"]), int(claims["exp"]))

    def _mint(self, audience: str, client_id: str, user_id: str, exp: int) -> str:
        now = int(self.clock())
        claims = {
            "iss": self.issuer.issuer,
            "aud": audience,
            "iat": now,
            "exp": exp,
            "jti": str(uuid.uuid4()),
            "azp": client_id,
            "sub": user_id,
        }
        header = {"alg": ALGORITHM, "typ": _TYPES[audience], "kid": self.issuer.kid}
        return jwt.encode(header, claims, self.issuer.key, algorithms=[ALGORITHM])

    def _verify(self, token: str, audience: str, client_id: str, what: str) -> dict[str, Any]:
        try:
            decoded = jwt.decode(token, self.issuer.public_key, algorithms=[ALGORITHM])
        except (JoseError, ValueError, TypeError):
            raise InvalidGrant(f"The {what} is not valid.") from None
        claims = dict(decoded.claims)
        valid = (
            decoded.header.get("typ") == _TYPES[audience]
            and claims.get("iss") == self.issuer.issuer
            and claims.get("aud") == audience
            and isinstance(claims.get("exp"), int)
            and isinstance(claims.get("sub"), str)
        )
        if not valid:
            raise InvalidGrant(f"The {what} is not valid.")
        if claims["exp"] <= self.clock():
            raise InvalidGrant(f"The {what} has expired.")
        if claims.get("azp") != client_id:
            raise InvalidGrant(f"The {what} was issued to another client.")
        return claims
