"""Who is calling and on whose feed: token → principal → registered app → target user.

This is where CreatedByApp isolation starts: a request is bound to exactly one (user, app) pair
here, and everything downstream is scoped to that pair.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from herald.auth.tokens import Principal, TokenVerifier, require_permission
from herald.errors import AccessDenied, InvalidRequest, NotFound, Unauthenticated
from herald.limits import RateCheck
from herald.model import App, Subscription
from herald.store import Directory, Subscriptions
from herald.users import canonical, is_principal_name, principal_name

log = logging.getLogger("herald.api")

MAX_USER_ID = 256
MAX_UNS_ID = 64
APP_CACHE_SECONDS = 30.0  # a newly registered app is seen at once (misses are not cached)
NAME_CACHE_SECONDS = 30.0  # likewise for user principal names
MAX_REMEMBERED = 10_000


@dataclass(frozen=True)
class Caller:
    principal: Principal
    app: App
    user_id: str
    # The device making the request: the X-UNS-ID subscription of a delegated caller, else None.
    device: str | None = None


class Apps:
    """Registered apps by client id, cached briefly: the lookup is on every request."""

    def __init__(self, store: Directory) -> None:
        self.store = store
        self.cache: dict[str, tuple[App, float]] = {}

    async def get(self, client_id: str) -> App | None:
        hit = self.cache.get(client_id)
        now = time.monotonic()
        if hit is not None and now - hit[1] < APP_CACHE_SECONDS:
            return hit[0]
        app = await self.store.get_app(client_id)
        if app is not None:
            self.cache[client_id] = (app, now)
        return app


class Users:
    """Who a path's `{user}` is (herald/users.py), and the principal names tokens teach."""

    def __init__(self, store: Directory, clock: Callable[[], datetime], learn: bool = True) -> None:
        self.store = store
        self.clock = clock
        self.learn = learn
        self.names: dict[str, tuple[str, float]] = {}  # upn -> (user id, when read)
        self.taught: dict[str, str] = {}  # upn -> user id already recorded from a token

    async def resolve(self, path_user: str) -> str:
        """The user id a path names: a GUID in lower case, a known UPN's user, else as given."""
        if not is_principal_name(path_user):
            return canonical(path_user)
        upn = principal_name(path_user)
        hit = self.names.get(upn)
        now = time.monotonic()
        if hit is not None and now - hit[1] < NAME_CACHE_SECONDS:
            return hit[0]
        found = await self.store.user_of(upn)
        if found is None:
            return path_user
        if len(self.names) >= MAX_REMEMBERED:
            self.names.clear()
        self.names[upn] = (found, now)
        return found

    async def taught_by(self, principal: Principal) -> None:
        """Record the principal name a delegated token gives its user (once per name and user).
        A name another user already has is not moved (the store keeps the first owner)."""
        if not self.learn or principal.upn is None or principal.user_id is None:
            return
        upn = principal_name(principal.upn)
        if self.taught.get(upn) == principal.user_id:
            return
        named = await self.store.name_user(upn, principal.user_id, pinned=False, now=self.clock())
        if not named:
            log.warning(
                "a token claims a principal name another user has; the name was not moved",
                extra={"upn": upn, "user": principal.user_id},
            )
        if len(self.taught) >= MAX_REMEMBERED:
            self.taught.clear()
        self.taught[upn] = principal.user_id  # asked once: not again for every request
        self.names.pop(upn, None)


@dataclass
class Access:
    """The authorisation policy: whose feed a request is on, as which app, within which rate
    limits. No HTTP here: it takes header values, so any front end can use it."""

    verifier: TokenVerifier
    apps: Apps
    limits: RateCheck
    store: Subscriptions
    clock: Callable[[], datetime]
    users: Users

    async def principal(self, authorization: str | None) -> Principal:
        """The verified caller behind an Authorization header value."""
        if not authorization:
            raise Unauthenticated("Access token is empty: send 'Authorization: Bearer <token>'.")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("The Authorization header must be 'Bearer <token>'.")
        principal = await self.verifier.verify(token.strip())
        require_permission(principal)
        return principal

    async def caller(
        self, authorization: str | None, path_user: str | None, uns_id: str | None = None
    ) -> Caller:
        """Authenticate, resolve the app, decide the target user, and apply rate limits.

        `uns_id` is the X-UNS-ID header: a subscription id that names the user for an app-only
        token, and the calling device for a delegated one.
        """
        principal = await self.principal(authorization)
        app = await self.apps.get(principal.client_id)
        if app is None:
            raise AccessDenied(f"The app '{principal.client_id}' is not registered with Herald.")
        await self.users.taught_by(principal)
        if path_user is not None:
            _check_path_user(path_user)
            path_user = await self.users.resolve(path_user)
        if uns_id is None:
            user_id, device = self._user(principal, path_user), None
        else:
            sub = await self.subscription(uns_id, principal, app, path_user)
            # Only a device's own (delegated) request comes *from* that device; an app server's
            # X-UNS-ID just names the user, and every device of theirs gets what it does.
            user_id, device = sub.user_id, (sub.id if principal.user_id is not None else None)
        # Per app, not per client id: an app's client ids share its budget.
        await self.limits.check(app.host_name, user_id)
        return Caller(principal, app, user_id, device)

    async def subscription(
        self, uns_id: str, principal: Principal, app: App, path_user: str | None
    ) -> Subscription:
        """The subscription an X-UNS-ID names, if the caller may act through it."""
        if not 0 < len(uns_id) <= MAX_UNS_ID or not uns_id.isprintable():
            raise InvalidRequest("X-UNS-ID is not a subscription id.", target="X-UNS-ID")
        sub = await self.store.get_subscription(uns_id.strip(), self.clock())
        if sub is None:
            raise NotFound(
                f"Subscription '{uns_id}' (X-UNS-ID) does not exist or has expired.",
                target="X-UNS-ID",
            )
        if sub.app != app.host_name:
            raise AccessDenied("The X-UNS-ID subscription belongs to another app.")
        for user in (principal.user_id, path_user):
            if user is not None and user != sub.user_id:
                raise AccessDenied("The X-UNS-ID subscription belongs to another user.")
        return sub

    @staticmethod
    def _user(principal: Principal, path_user: str | None) -> str:
        if principal.user_id is not None:
            if path_user is not None and path_user != principal.user_id:
                raise AccessDenied("A delegated token may only act on its own user's feed.")
            return principal.user_id
        if path_user is None:
            raise InvalidRequest(
                "An app-only token has no user: name a subscription with X-UNS-ID, "
                "or call /users/{id}/notifications.",
                target="X-UNS-ID",
            )
        return path_user


def _check_path_user(path_user: str) -> None:
    if not path_user or len(path_user) > MAX_USER_ID or not path_user.isprintable():
        raise InvalidRequest("The user id in the path is not a valid id.", target="user")
