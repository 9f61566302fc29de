"""Webhook delivery: each app's change feed (`appfeed.py`), POSTed in batches to the URLs the app
registered, signed as Standard Webhooks sign (https://www.standardwebhooks.com/).

* Durable: a webhook's cursor (the feed seq delivered up to) is in the store and moves only after
  a 2xx answer, so a crash or a kill resends the batch in flight: at least once. Each event has
  an `id` (its feed seq) to de-duplicate by; a resent batch keeps its `webhook-id` if its range
  is unchanged.
* In order: one batch in flight per webhook, in seq order, so each user's changes arrive in
  position order.
* Retried: any other answer, a timeout or a connection error is a failure; the batch is retried
  after `webhook_backoff_base` seconds, doubling up to `webhook_backoff_max`. Once a webhook has
  been failing for `webhook_give_up` seconds its status becomes "failed" and delivery stops (the
  app re-enables it with a PATCH; it resumes from its cursor).
* Cheap when idle: while any webhook is active a commit wakes delivery, which reads only the
  webhooks with something after their cursor (`due_webhooks`), so a change of one app costs
  one read, not a read (and a cursor write) per webhook of every app.
* One node at a time: a webhook is delivered by the node that holds the dispatch shard
  `crc32(id) % SHARDS` (`leases.py`; with SQLite the one process holds all).
* SSRF: the URL must be public (checked at registration, before each POST, and on the addresses
  connected to), and redirects are not followed, unless `webhook_allow_private_endpoints`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import hmac
import logging
import secrets
import zlib
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, Protocol

import httpx
import msgspec

from herald import appfeed
from herald.errors import HeraldError, InvalidRequest
from herald.feed import Clock
from herald.outbound.leases import Leases
from herald.outbound.providers.clients import Http1, exchange, tls_context
from herald.outbound.providers.guard import Guard
from herald.settings import Settings
from herald.store import SHARDS, ChangeFeed, Retention, Webhook, Webhooks

log = logging.getLogger("herald.webhooks")

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32
PRUNE_TURN = "change-feed-prune"
USER_AGENT = "Herald-Webhooks/1"


class HookStore(ChangeFeed, Webhooks, Retention, Protocol):
    """What delivery uses: the feed, the webhooks, turns for pruning, and commit signals."""

    def on_commit(self, callback: Callable[[], None]) -> None: ...


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def check_secret(secret: str) -> str:
    """A secret the app chose: `whsec_` and base64 of 24 to 64 bytes."""
    try:
        key = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except ValueError:
        key = b""
    if not secret.startswith(SECRET_PREFIX) or not 24 <= len(key) <= 64:
        raise InvalidRequest(
            "secret must be 'whsec_' followed by the base64 of 24 to 64 random bytes"
            " (or left out: Herald generates one).",
            target="secret",
        )
    return secret


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header: v1, then the base64 HMAC-SHA256 of "id.timestamp.body"
    under the secret's key."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    signed = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


class Batch(msgspec.Struct, frozen=True, rename="camel"):
    webhook_id: str
    app: str
    changes: list[appfeed.ChangeEvent]


class Envelope(msgspec.Struct, frozen=True):
    type: str
    timestamp: datetime
    data: Batch


_encode = msgspec.json.Encoder().encode


class Delivery:
    """Delivers every due webhook this node holds, one batch in flight per webhook."""

    def __init__(
        self, store: HookStore, settings: Settings, clock: Clock, leases: Leases | None = None
    ) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self.leases = leases
        self.guard = Guard(settings.webhook_allow_private_endpoints)
        self.http = Http1(
            tls_context(settings.push_ca_file),
            settings.webhook_timeout,
            public_only=not settings.webhook_allow_private_endpoints,
        )
        self.wake = asyncio.Event()
        self.flying: dict[str, asyncio.Task[None]] = {}
        # Webhooks woken while a delivery of theirs was in flight (it may have read the feed
        # before the change that woke us): looked at again as soon as it ends.
        self.again: set[str] = set()
        # Whether any webhook is active (read at each poll; a due one shows it too): commits
        # wake us then, so a change reaches its webhooks at once, not at the next poll.
        self.active = False
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.store.on_commit(self.committed)
        self.task = asyncio.create_task(self.run(), name="herald-webhooks")

    def committed(self) -> None:
        if self.active:
            self.wake.set()

    async def close(self) -> None:
        tasks = [t for t in (self.task, *self.flying.values()) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self.task = None
        await self.http.aclose()

    async def run(self) -> None:
        last_prune = 0.0
        loop = asyncio.get_running_loop()
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.webhook_poll_interval):
                    await self.wake.wait()
            polled = not self.wake.is_set()
            self.wake.clear()
            try:
                if polled:
                    self.active = await self.store.webhooks_active()
                if self.active:
                    await self.look()
                if loop.time() - last_prune >= self.settings.sweep_interval:
                    last_prune = loop.time()
                    await self.prune()
            except HeraldError as exc:  # the store is out: look again at the next poll
                log.warning("webhook delivery could not read the store", extra={"error": str(exc)})

    async def look(self) -> None:
        """Start a delivery for each due webhook of this node that has none in flight."""
        # A delivery in flight now may end (a failure sets its backoff) before the read answers:
        # its row as read is stale, so it is looked at again instead.
        busy = set(self.flying)
        due = await self.store.due_webhooks(self.clock())
        self.active = self.active or bool(due)
        held = self.leases.shards() if self.leases is not None else None
        for hook in due:
            if hook.id in busy or hook.id in self.flying:
                self.look_again(hook.id)
                continue
            if held is not None and zlib.crc32(hook.id.encode()) % SHARDS not in held:
                continue
            task = asyncio.create_task(self.deliver(hook), name=f"herald-webhook-{hook.id}")
            self.flying[hook.id] = task
            task.add_done_callback(functools.partial(self.done, hook.id))

    def look_again(self, id: str) -> None:
        """Look at `id` afresh once its delivery in flight (if still) has ended."""
        if id in self.flying:
            self.again.add(id)
        else:
            self.wake.set()

    def done(self, id: str, task: asyncio.Task[None]) -> None:
        self.flying.pop(id, None)
        if id in self.again:
            self.again.discard(id)
            self.wake.set()

    async def prune(self) -> None:
        now = self.clock()
        if await self.store.take_turn(PRUNE_TURN, now, self.settings.sweep_interval):
            retention = timedelta(seconds=self.settings.change_retention)
            await self.store.prune_feed(now - retention)

    async def deliver(self, hook: Webhook) -> None:
        """Send batches from the cursor until the feed is exhausted or one fails."""
        try:
            while await self.deliver_batch(hook):
                fresh = await self.store.get_webhook(hook.app, hook.id)
                if fresh is None or fresh.status != "active":
                    return
                hook = fresh
        except HeraldError as exc:
            log.warning("webhook delivery failed in the store", extra={"error": str(exc)})
        except Exception:
            log.exception("webhook delivery failed", extra={"webhook": hook.id})

    async def deliver_batch(self, hook: Webhook) -> bool:
        """One batch: True if the cursor moved (there may be more)."""
        s = self.settings
        page = await self.store.app_changes(hook.app, hook.cursor, s.webhook_batch)
        entries, scanned = page.entries, page.cursor
        if scanned == hook.cursor:
            return False
        wanted = set(hook.kinds)
        events = [appfeed.event(seq, c) for seq, c in entries if c.kind.value in wanted]
        if not events:  # nothing of the kinds it takes: skip ahead without a POST
            return await self.store.webhook_delivered(
                hook.id, hook.cursor, scanned, self.clock(), None
            )
        status, error = await self.post(hook, events, scanned)
        now = self.clock()
        if status is not None and 200 <= status < 300:
            moved = await self.store.webhook_delivered(hook.id, hook.cursor, scanned, now, status)
            return moved and page.more
        since = hook.failing_since or now
        give_up = (now - since).total_seconds() >= s.webhook_give_up
        delay = min(s.webhook_backoff_base * 2 ** min(hook.failures, 60), s.webhook_backoff_max)
        await self.store.webhook_failed(
            hook.id, hook.cursor, now, status, error, now + timedelta(seconds=delay), give_up
        )
        log.info(
            "webhook delivery failed",
            extra={"webhook": hook.id, "status": status, "error": error, "give_up": give_up},
        )
        return False

    async def post(
        self, hook: Webhook, events: list[appfeed.ChangeEvent], scanned: int
    ) -> tuple[int | None, str]:
        """POST one batch; (the answer's status or None, what went wrong if anything)."""
        if not await self.guard.allowed(hook.url):
            return None, "the URL resolves to a private address"
        now = self.clock()
        body = _encode(Envelope("notifications.changed", now, Batch(hook.id, hook.app, events)))
        # The same range gives the same id, so a receiver can tell a retry.
        message_id = f"msg_{hook.id}_{events[0].sequence}_{scanned}"
        timestamp = int(now.timestamp())
        headers = {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            "webhook-id": message_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(hook.secret, message_id, timestamp, body),
        }
        try:
            answer = await exchange(self.http, "POST", hook.url, content=body, headers=headers)
        except httpx.TimeoutException:
            return None, f"no answer within {self.settings.webhook_timeout} s"
        except httpx.HTTPError as exc:
            return None, f"connection failed: {exc}"
        if 200 <= answer.status_code < 300:
            return answer.status_code, ""
        return answer.status_code, f"HTTP {answer.status_code}"


def describe(hook: Webhook, now: datetime, oldest_pending: datetime | None) -> dict[str, Any]:
    """The delivery state of a webhook as GET shows it."""
    lag = 0.0 if oldest_pending is None else max(0.0, (now - oldest_pending).total_seconds())
    return {
        "cursor": appfeed.token(hook.cursor),
        "consecutiveFailures": hook.failures,
        "failingSinceDateTime": hook.failing_since,
        "lastAttemptDateTime": hook.last_attempt,
        "lastSuccessDateTime": hook.last_success,
        "lastStatusCode": hook.last_status,
        "lastError": hook.last_error,
        "nextAttemptDateTime": hook.next_attempt,
        "oldestPendingChangeDateTime": oldest_pending,
        "lagSeconds": round(lag, 3),
    }
