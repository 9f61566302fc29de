"""The use cases on a user's notification feed, independent of HTTP.

Every call is scoped to one (user, app) pair: CreatedByApp isolation is enforced here by
construction, because the store is only ever asked about that pair.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from datetime import UTC, datetime

from herald.errors import AccessDenied
from herald.model import Content, Notification, StatePatch
from herald.query import Filter, Page, Query
from herald.store import Notifications, Once, Remembered

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    """A UUIDv7 (RFC 9562): a GUID like Graph's ids, but time-ordered, so that inserting a new
    notification appends to the primary-key index instead of dirtying a random page.

    Formatted by hand (uuid.UUID costs several microseconds on the hot path). The random bits
    need not be unguessable: every lookup is scoped to the caller's user and app anyway.
    """
    ms = time.time_ns() // 1_000_000
    h = f"{ms:012x}7{random.getrandbits(12):03x}{0x8000 | random.getrandbits(14):04x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{random.getrandbits(48):012x}"


def _check_target(app: str, content: Content) -> None:
    if content.target_host_name.lower() != app.lower():
        raise AccessDenied(
            f"targetHostName '{content.target_host_name}' does not belong to the calling app."
        )


class Feed:
    def __init__(self, store: Notifications, clock: Clock = utcnow) -> None:
        self.store = store
        self.clock = clock

    async def post(
        self, user_id: str, app: str, content: Content, origin: str | None = None
    ) -> tuple[Notification, bool]:
        """Create or replace (same appNotificationId). Returns (notification, created)."""
        _check_target(app, content)
        return await self.store.put(user_id, app, content, new_id(), self.clock(), origin)

    async def post_once(
        self, user_id: str, app: str, content: Content, once: Once, origin: str | None = None
    ) -> Remembered:
        """`post` with an Idempotency-Key, recorded in the same transaction: the answer to give
        (this post's, or the one recorded first under the key)."""
        _check_target(app, content)
        return await self.store.put_once(
            user_id, app, content, new_id(), self.clock(), once, origin
        )

    async def get(self, user_id: str, app: str, id: str) -> Notification | None:
        return await self.store.get(user_id, app, id, self.clock())

    async def list(self, user_id: str, app: str, query: Query) -> Page:
        return await self.store.list(user_id, app, query, self.clock())

    async def count(self, user_id: str, app: str, filter: Filter | None) -> int:
        return await self.store.count(user_id, app, filter, self.clock())

    # `origin`: the subscription (device) making the change; fan-out leaves it out.
    async def update(
        self,
        user_id: str,
        app: str,
        id: str,
        patch: StatePatch,
        if_match: int | None,
        origin: str | None = None,
    ) -> Notification:
        return await self.store.update(user_id, app, id, patch, if_match, self.clock(), origin)

    async def delete(
        self, user_id: str, app: str, id: str, if_match: int | None, origin: str | None = None
    ) -> None:
        await self.store.delete(user_id, app, id, if_match, self.clock(), origin)

    async def delete_group(
        self, user_id: str, app: str, group_name: str, origin: str | None = None
    ) -> int:
        return await self.store.delete_group(user_id, app, group_name, self.clock(), origin)
