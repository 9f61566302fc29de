"""The keyring: apps' push credentials from the store, cached briefly."""

from __future__ import annotations

import time
from typing import Any

from herald.store import PushCredentials

MISS_TTL = 2.0  # seconds a missing credential is remembered


class Keyring:
    """App push credentials from the store, cached briefly: `herald app push-set` (another
    process) takes effect within `ttl` seconds, or at once after a credentials failure."""

    def __init__(self, store: PushCredentials, ttl: float = 30.0) -> None:
        self.store = store
        self.ttl = ttl
        self.cache: dict[str, tuple[float, dict[str, bytes]]] = {}

    async def get(self, app: str, kind: str) -> bytes | None:
        hit = self.cache.get(app)
        age = time.monotonic() - hit[0] if hit is not None else 0.0
        # A missing credential is looked for again sooner: `herald app push-set` may come any
        # moment, and the retries waiting for it should not wait out the whole ttl.
        if hit is None or age > self.ttl or (kind not in hit[1] and age > MISS_TTL):
            hit = (time.monotonic(), await self.store.get_push_credentials(app))
            self.cache[app] = hit
        return hit[1].get(kind)

    async def ensure(self, app: str, kind: str, make: Any) -> bytes:
        """The credential, created with `make()` if the app has none (first writer wins)."""
        found = await self.get(app, kind)
        if found is not None:
            return found
        stored = await self.store.put_push_credentials(app, kind, make(), replace=False)
        self.forget(app)
        return stored

    def forget(self, app: str) -> None:
        self.cache.pop(app, None)
