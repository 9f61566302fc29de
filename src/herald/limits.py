"""Limits: what a notification may be (`Limits`, from the settings) and rate limits.

Rate limits are token buckets per app and per (app, user): in this process (`RateLimits`), or
shared by every process through Redis when the Redis broker is configured
(`herald.broker.limits.ClusterRateLimits`, which falls back to these when Redis is unreachable).

A bucket holds up to `burst` tokens and refills at `rate` per second; a request takes one. When a
bucket is empty the caller gets 429 with the seconds until a token is back (`Retry-After`).
Buckets idle long enough to be full again are dropped so memory stays bounded.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Protocol

import msgspec

from herald.errors import Throttled


class Limits(msgspec.Struct, frozen=True):
    """A notification's (or a subscription's) size and lifetime bounds."""

    max_payload_bytes: int
    default_ttl: int
    max_ttl: int
    clamp_ttl: bool


class Bucket:
    __slots__ = ("stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp


class Limiter:
    def __init__(
        self,
        rate: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 100_000,
    ) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.clock = clock
        self.max_keys = max_keys
        self.buckets: dict[str, Bucket] = {}

    def wait_time(self, key: str) -> float:
        """Take a token for `key`: 0.0 if allowed, else the seconds until one is available."""
        now = self.clock()
        bucket = self.buckets.get(key)
        if bucket is None:
            if len(self.buckets) >= self.max_keys:
                self._prune(now)
            bucket = self.buckets[key] = Bucket(self.burst, now)
        else:
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.stamp) * self.rate)
            bucket.stamp = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.rate

    def _prune(self, now: float) -> None:
        full_after = self.burst / self.rate
        self.buckets = {k: b for k, b in self.buckets.items() if now - b.stamp < full_after}


class RateCheck(Protocol):
    """The rate limits requests are checked against, wherever their buckets are kept."""

    async def check(self, client_id: str, user_id: str | None) -> None:
        """Take a token of the app's bucket, then of the (app, user) pair's; `Throttled` with
        `retry_after` when one is empty (an app's token is spent even if its user's is not)."""

    async def close(self) -> None: ...


class RateLimits:
    """The limits one request is checked against: its app, and its (app, user) pair."""

    def __init__(self, app: Limiter, user: Limiter) -> None:
        self.app = app
        self.user = user

    async def check(self, client_id: str, user_id: str | None) -> None:
        self.take(client_id, user_id)

    def take(self, client_id: str, user_id: str | None) -> None:
        wait = self.app.wait_time(client_id)
        what = "app"
        if not wait and user_id is not None:
            wait = self.user.wait_time(f"{client_id}\x00{user_id}")
            what = "user"
        if wait:
            throttle(what, wait)

    async def close(self) -> None:
        pass


def throttle(what: str, wait: float) -> None:
    """Refuse a request over the `what` ("app", "user") limit, `wait` seconds from a token."""
    raise Throttled(
        f"Too many requests for this {what}; retry later.", retry_after=max(1, math.ceil(wait))
    )
