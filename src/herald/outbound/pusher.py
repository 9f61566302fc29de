"""The push engine: sends queued deliveries through their providers' senders and records each
outcome.

One lane per provider: it claims due deliveries from the store (leased, so another node or a
restart does not send them at the same time), sends up to `push_concurrency` at once, and hands
the outcomes to the settler (`settler.py`), which records them in batches. Lanes share nothing,
so a provider that is slow or down holds up only its own queue. Retries are rows with a later
due time: they survive restarts, back off exponentially with full jitter, honour Retry-After,
and stop at the attempt limit or the notification's expiration (docs/push.md, "Delivery
engine").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Iterable
from datetime import datetime, timedelta

from herald.errors import HeraldError
from herald.feed import Clock, utcnow
from herald.metrics import Metrics
from herald.model import Delivery, Provider, PushKind, Settle, Settlement
from herald.outbound.providers.sender import Outcome, Result, Sender
from herald.outbound.settler import Settler
from herald.settings import Settings
from herald.store import DeliveryQueue

log = logging.getLogger("herald.push")

CLAIM_BATCH = 256
# A lane sleeps until its earliest delivery is due, or a new one is queued here, but at most this
# long: other nodes queue deliveries too, and nothing wakes this lane for those.
POLL_SECONDS = 1.0
MIN_WAIT = 0.005  # seconds: a due time already past (a claim skipped it) is retried this soon
GAUGE_SECONDS = 10.0
LOUD_EVERY = 60.0  # seconds between ERROR lines for one app's refused credentials


class Pusher:
    def __init__(
        self,
        store: DeliveryQueue,
        senders: dict[Provider, Sender],
        settings: Settings,
        metrics: Metrics,
        clock: Clock = utcnow,
        poll: float = POLL_SECONDS,
    ) -> None:
        self.store = store
        self.senders = senders
        self.settings = settings
        self.metrics = metrics
        self.clock = clock
        self.settler = Settler(store, clock)
        self.lanes = {
            provider: Lane(self, provider, sender, poll) for provider, sender in senders.items()
        }
        self.loud: dict[tuple[str, Provider], float] = {}

    async def start(self) -> None:
        self.settler.start()
        for lane in self.lanes.values():
            lane.start()

    def wake(self, providers: Iterable[Provider]) -> None:
        """New deliveries were queued for these providers."""
        for provider in providers:
            lane = self.lanes.get(provider)
            if lane is not None:
                lane.wake.set()

    async def close(self) -> None:
        """Stop claiming, let sends in flight finish (within the push timeout), record them."""
        await asyncio.gather(*(lane.close() for lane in self.lanes.values()))
        await self.settler.close()
        for sender in self.senders.values():
            await sender.close()

    def settlement(self, d: Delivery, outcome: Outcome, now: datetime) -> Settlement:
        """What to record for an attempt's outcome (the retry policy lives here)."""
        if outcome.result is Result.DELIVERED:
            return _settle(d, Settle.DONE, sent=True)
        if outcome.result is Result.GONE:
            return _settle(d, Settle.GONE, outcome.reason)
        if outcome.result is Result.REJECTED:
            return _settle(d, Settle.DROP, outcome.reason)
        s = self.settings
        if d.attempts >= s.push_max_attempts:
            return _settle(d, Settle.DROP, f"gave up after {d.attempts} attempts: {outcome.reason}")
        wait = random.uniform(
            0.0, min(s.push_backoff_max, s.push_backoff_base * 2 ** min(d.attempts, 60))
        )
        # A provider's Retry-After is honoured, up to the backoff cap (not years).
        wait = max(wait, min(outcome.retry_after or 0.0, s.push_backoff_max), 0.1)
        due = now + timedelta(seconds=wait)
        if due >= d.message.expires:
            return _settle(d, Settle.DROP, f"expired before delivery: {outcome.reason}")
        return _settle(d, Settle.RETRY, outcome.reason, due=due)

    def report(self, d: Delivery, outcome: Outcome, seconds: float) -> None:
        provider = d.provider.value
        self.metrics.push_attempts.labels(provider, outcome.result.value).inc()
        self.metrics.push_seconds.labels(provider).observe(seconds)
        if outcome.credentials:
            self.metrics.push_credential_failures.labels(provider).inc()
            key = (d.app, d.provider)
            now = time.monotonic()
            if now - self.loud.get(key, -LOUD_EVERY) >= LOUD_EVERY:
                self.loud[key] = now
                log.error(
                    "push credentials refused: deliveries are being retried until the "
                    "credentials are fixed (herald app push-set) or their attempts run out",
                    extra={"app": d.app, "provider": provider, "reason": outcome.reason},
                )
        elif outcome.result is Result.GONE:
            log.info(
                "push channel gone",
                extra={"subscription": d.subscription_id, "reason": outcome.reason},
            )
        elif outcome.result is Result.REJECTED:
            log.warning(
                "push rejected",
                extra={
                    "subscription": d.subscription_id,
                    "provider": provider,
                    "reason": outcome.reason,
                },
            )


def _settle(
    d: Delivery,
    settle: Settle,
    error: str | None = None,
    sent: bool = False,
    due: datetime | None = None,
) -> Settlement:
    return Settlement(
        id=d.id,
        subscription_id=d.subscription_id,
        settle=settle,
        attempts=d.attempts,
        channel_key=d.channel.key,
        sent=sent,
        due=due,
        error=None if error is None else printable(error),
    )


def printable(text: str) -> str:
    """A reason fit to store and show: no control characters (a push service's answer may
    carry anything), at most 300 characters."""
    return "".join(c if c.isprintable() else " " for c in text[:300])


class Lane:
    """One provider's queue: claims due deliveries while it has free slots, sends them, and
    sleeps until the next one is due (`until_due`, or `expect` for a retry it just scheduled)."""

    def __init__(self, pusher: Pusher, provider: Provider, sender: Sender, poll: float) -> None:
        self.pusher = pusher
        self.provider = provider
        self.sender = sender
        self.poll = poll
        self.limit = pusher.settings.push_concurrency
        self.wake = asyncio.Event()
        self.inflight: set[asyncio.Task[None]] = set()
        self.task: asyncio.Task[None] | None = None
        self.full = False
        self.gauge_at = 0.0
        self.wake_at = math.inf  # monotonic time the current sleep ends
        self.alarm = math.inf  # monotonic time of the `expect` timer, if one is set
        self.timer: asyncio.TimerHandle | None = None
        # The earliest retry this lane scheduled: its settlement may not be in the store yet.
        self.soonest: datetime | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self.run(), name=f"herald-push-{self.provider}")

    async def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        if self.inflight:
            await asyncio.wait(self.inflight, timeout=self.pusher.settings.push_timeout + 1)

    async def run(self) -> None:
        store = self.pusher.store
        lease = self.pusher.settings.push_lease
        while True:
            self.wake.clear()
            try:
                free = self.limit - len(self.inflight)
                if free > 0:
                    want = min(free, CLAIM_BATCH)
                    claimed = await store.claim(self.provider, self.pusher.clock(), lease, want)
                    for delivery in claimed:
                        task = asyncio.create_task(self.attempt(delivery))
                        self.inflight.add(task)
                        task.add_done_callback(self.done)
                    self.full = len(claimed) == want
                    if self.full and len(self.inflight) < self.limit:
                        continue  # more may be due
                else:
                    self.full = True
                await self.update_gauge()
                delay = await self.until_due()
            except HeraldError as exc:  # the store is unavailable: back off, try again
                log.warning("push claim failed", extra={"error": exc.message})
                await asyncio.sleep(self.poll)
                continue
            except Exception:  # a bug: log it, keep the lane alive
                log.exception("push lane failed", extra={"provider": self.provider.value})
                await asyncio.sleep(self.poll)
                continue
            self.wake_at = time.monotonic() + delay
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self.wake.wait()
            self.wake_at = math.inf

    async def until_due(self) -> float:
        """Seconds until this provider's earliest queued delivery is due, at most `poll` (and
        `poll` while the lane is full: `done` wakes it when there is room)."""
        if self.full:
            return self.poll
        due = await self.pusher.store.next_due(self.provider)
        now = self.pusher.clock()
        if self.soonest is not None:
            if self.soonest <= now:
                self.soonest = None  # claimed, or in the store for next_due to find
            elif due is None or self.soonest < due:
                due = self.soonest
        if due is None:
            return self.poll
        return min(self.poll, max(MIN_WAIT, (due - now).total_seconds()))

    def expect(self, due: datetime) -> None:
        """A retry was scheduled for `due`: be awake then, if the lane would sleep past it (its
        sleep was planned before the retry was)."""
        if self.soonest is None or due < self.soonest:
            self.soonest = due
        delay = max(0.0, (due - self.pusher.clock()).total_seconds())
        at = time.monotonic() + delay
        if at >= min(self.wake_at, self.alarm):
            return
        if self.timer is not None:
            self.timer.cancel()
        self.alarm = at
        self.timer = asyncio.get_running_loop().call_later(delay, self.ring)

    def ring(self) -> None:
        self.alarm, self.timer = math.inf, None
        self.wake.set()

    def done(self, task: asyncio.Task[None]) -> None:
        self.inflight.discard(task)
        if self.full and len(self.inflight) <= self.limit // 2:
            self.wake.set()  # room for a batch again

    async def attempt(self, d: Delivery) -> None:
        pusher = self.pusher
        if d.message.kind is PushKind.FALLBACK and d.seen_position >= d.message.position:
            pusher.settler.add(_settle(d, Settle.DONE))  # the device fetched it: not needed
            return
        start = time.perf_counter()
        try:
            # The whole attempt, token requests included, within push_timeout: httpx's timeout
            # bounds each read, not a server that drips its answer.
            async with asyncio.timeout(pusher.settings.push_timeout):
                outcome = await self.sender.send(d.app, d.channel, d.message)
        except TimeoutError:
            outcome = Outcome(Result.RETRY, "timeout")
        except Exception as exc:  # a bug in a sender must not lose the delivery
            log.exception("push sender failed", extra={"provider": self.provider.value})
            outcome = Outcome(Result.RETRY, f"internal error: {type(exc).__name__}")
        pusher.report(d, outcome, time.perf_counter() - start)
        try:
            settlement = pusher.settlement(d, outcome, pusher.clock())
        except (OverflowError, ValueError):  # defensive: never leave a claim unsettled
            log.exception("push settlement failed", extra={"provider": self.provider.value})
            settlement = _settle(d, Settle.DROP, "internal error")
        pusher.settler.add(settlement)
        if settlement.due is not None:
            self.expect(settlement.due)

    async def update_gauge(self) -> None:
        now = time.monotonic()
        if now - self.gauge_at < GAUGE_SECONDS:
            return
        self.gauge_at = now
        queued = await self.pusher.store.count_deliveries(self.provider)
        self.pusher.metrics.push_queued.labels(self.provider.value).set(queued)
