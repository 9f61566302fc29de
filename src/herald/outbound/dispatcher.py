"""The dispatcher: turns committed outbox entries into deliveries.

The store writes an outbox entry with every change, in the same transaction (see
`store/contract.py`). This loop reads them oldest first and publishes each change to the broker
(the live streams); then, while it goes on with the next batch (neither the read of push targets
nor the commit holds up live delivery), the batch's removal works out the pushes for the devices'
push channels (`targets.py`) and removes the entries while queueing those pushes, in one
transaction; removals are queued in batch order. The push engine (`pusher.py`) sends
them. A crash in between publishes those changes again after restart: at-least-once, and
streams drop what they have already sent by position; pushes are queued exactly once. It wakes
on the store's commit signal and also polls, so entries written by another process (or left by
a crash) are picked up too.

A store may hand over a post's entries as it commits (`Outbox.on_outboxed`, PostgreSQL): each
its user's first left in the outbox, so publishing it at once keeps the user's order. While
this node drains every shard, they are published then, without the outbox read (a round trip on
the path of each live delivery), and removed in batches by one task; a commit whose entries were
all handed over wakes no read.

With `leases`, it drains only the outbox shards this node holds (`leases.py`): each user has one
dispatcher at a time, so per-user order holds at the source. Entries another node committed to
a shard held here are found on that node's wake-up (`waker`, Redis), or else by the poll: every
`SHARED_POLL_SECONDS` while shards are shared.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Iterable
from datetime import datetime
from typing import Any, Protocol

import msgspec

from herald.broker import Broker
from herald.errors import HeraldError
from herald.feed import Clock, utcnow
from herald.metrics import Metrics
from herald.model import ChangeKind, NewDelivery, Pending, Provider, Subscription
from herald.outbound import targets
from herald.outbound.leases import Leases
from herald.preferences import (
    Decision,
    HeldPush,
    NotificationPreferences,
    quiet_period_end,
    verdict,
)
from herald.store import SHARDS, Outbox, Preferences

log = logging.getLogger("herald.dispatcher")

BATCH = 512
POLL_SECONDS = 1.0
# While other nodes hold shards: their commits do not wake this node, whose shards they may touch.
SHARED_POLL_SECONDS = 0.25
RETRY_SECONDS = 1.0
MAX_REMOVALS = 4  # outbox removals in flight at once
# How long published entries handed over by the store wait to be removed together: at most one
# removal per 10 ms, where a removal per post was one transaction per post (~450/s at 1,000
# posts/s, pg_stat_statements). Off the path of live delivery; it delays their pushes by as much.
GATHER_SECONDS = 0.01


class Waker(Protocol):
    """Wakes the other nodes' dispatchers (`broker/wake.py`); may lose a wake-up."""

    async def start(self, woken: Callable[[], None], released: Callable[[], None]) -> None:
        """`woken`: another node committed outbox entries; `released`: it gave shards back."""

    def signal(self) -> None:
        """This node committed outbox entries."""

    def hand_over(self) -> None:
        """This node gave shards back (said at the latest by `close`)."""

    async def close(self) -> None: ...


class DispatchStore(Outbox, Preferences, Protocol):
    pass


class Dispatcher:
    def __init__(
        self,
        store: DispatchStore,
        broker: Broker,
        metrics: Metrics,
        poll: float = POLL_SECONDS,
        pushed: Callable[[Iterable[Provider]], None] | None = None,
        clock: Clock = utcnow,
        leases: Leases | None = None,
        waker: Waker | None = None,
    ) -> None:
        self.store = store
        # None: this node drains the whole outbox.
        self.leases = leases
        self.waker = waker
        self.broker = broker
        self.metrics = metrics
        self.poll = poll
        # Called with the providers of newly queued pushes; None: pushes are off.
        self.pushed = pushed
        self.clock = clock
        self.wake = asyncio.Event()
        self.dispatched = 0
        self.task: asyncio.Task[None] | None = None
        # Published entries whose removal from the outbox has not committed yet: the next batch
        # is read (and published) without waiting for that commit, and skips them.
        self.removing: set[int] = set()
        self.removals: set[asyncio.Task[None]] = set()
        # Done once the last batch's removal has looked up its push targets and been handed to
        # the store: the next one waits for it, so removals are queued in batch order.
        self.looked_up: asyncio.Future[None] | None = None
        # Entries published as the store handed them over, waiting for `flush` to remove them.
        self.handed: list[Pending] = []
        self.flusher: asyncio.Task[None] | None = None
        # The last commit's entries were all published from `outboxed`: its wake reads nothing.
        self.taken = False

    async def start(self) -> None:
        self.store.on_outboxed(self.outboxed)
        self.store.on_commit(self.committed)
        if self.waker is not None:
            renew = self.leases.renew_soon if self.leases is not None else _nothing
            await self.waker.start(self.wake.set, renew)
        if self.leases is not None:
            self.leases.gained = self.wake.set
            if self.waker is not None:
                self.leases.lost = self.waker.hand_over
            await self.leases.start()
        self.task = asyncio.create_task(self.run(), name="herald-dispatcher")

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None
        if self.removals:
            await asyncio.gather(*self.removals, return_exceptions=True)
        if self.leases is not None:  # after the last removal: no overlap with the next owner
            await self.leases.close()
            if self.waker is not None:
                self.waker.hand_over()
        if self.waker is not None:
            await self.waker.close()

    def committed(self) -> None:
        """This node committed outbox entries: drain them, and, if other nodes hold shards (of
        which they may be), wake those. Not if `outboxed` has just published them all."""
        if self.taken:
            self.taken = False
            return
        self.wake.set()
        if self.waker is not None and self.scope() is not None:
            self.waker.signal()

    async def run(self) -> None:
        while True:
            self.wake.clear()
            try:
                while await self.drain() == BATCH:
                    pass  # a full batch: more may be waiting
            except HeraldError as exc:  # the store is unavailable: back off, try again
                log.warning("dispatch failed", extra={"error": exc.message})
                await asyncio.sleep(RETRY_SECONDS)
                continue
            except Exception:  # a bug: log it, keep dispatching (the entries stay in the outbox)
                log.exception("dispatch failed")
                await asyncio.sleep(RETRY_SECONDS)
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval()):
                    await self.wake.wait()

    async def outboxed(self, entries: list[Pending], whole: bool) -> None:
        """`Outbox.on_outboxed`: publish the entries now, and queue their removal. Only while
        this node holds every shard: entries of other nodes' shards are theirs to publish."""
        if self.task is None or self.scope() is not None:
            return
        fresh = [e for e in entries if e.seq not in self.removing]  # else read and published
        await self.publish(fresh)
        self.handed.extend(fresh)
        if self.handed and (self.flusher is None or self.flusher.done()):
            self.flusher = asyncio.create_task(self.flush())
            self.removals.add(self.flusher)
            self.flusher.add_done_callback(self.removals.discard)
        self.taken = whole  # after the last await: the commit's `committed` comes next

    async def flush(self) -> None:
        """Remove the handed-over entries, each time all those published meanwhile at once:
        after one post at a time, a removal per post would be a transaction per post."""
        while self.handed:
            await asyncio.sleep(GATHER_SECONDS)
            batch, self.handed = self.handed, []
            await self.next_removal(batch)

    def scope(self) -> frozenset[int] | None:
        """The shards to drain: None for all of them."""
        if self.leases is None:
            return None
        shards = self.leases.shards()
        return None if len(shards) == SHARDS else shards

    def interval(self) -> float:
        return self.poll if self.scope() is None else min(self.poll, SHARED_POLL_SECONDS)

    async def drain(self) -> int:
        """Publish one batch of pending changes; their removal from the outbox follows."""
        if len(self.removals) >= MAX_REMOVALS:
            await asyncio.wait(self.removals, return_when=asyncio.FIRST_COMPLETED)
        # An entry whose removal commits while `pending` reads may still come back from it: skip
        # what was being removed when the read began too, or its pushes would be queued twice.
        skip = set(self.removing)
        shards = self.scope()
        if shards is not None and not shards:
            return 0  # no lease (yet, or any more)
        pending = await self.store.pending(BATCH, shards, skip)
        fresh = [e for e in pending if e.seq not in skip and e.seq not in self.removing]
        if not fresh:
            return 0
        await self.publish(fresh)
        # The push targets are looked up by the removal, not here: that read is not on the path
        # of the next batch's live delivery.
        task = asyncio.create_task(self.next_removal(fresh))
        self.removals.add(task)
        task.add_done_callback(self.removals.discard)
        return len(fresh)

    async def publish(self, entries: list[Pending]) -> None:
        """Publish the entries' changes, in order, and mark them as being removed."""
        now = time.time()
        for entry in entries:
            await self.broker.publish(entry.change)
            self.metrics.dispatch_lag.observe(max(0.0, now - entry.change.at.timestamp()))
        self.removing.update(entry.seq for entry in entries)

    def next_removal(self, entries: list[Pending]) -> Coroutine[Any, Any, None]:
        """The entries' removal, queued behind the last one's push-target lookup (`remove`), so
        removals reach the store in the order their batches were published."""
        looked_up = asyncio.get_running_loop().create_future()
        before, self.looked_up = self.looked_up, looked_up
        return self.remove(entries, before, looked_up)

    async def deliveries(self, entries: list[Pending]) -> tuple[list[NewDelivery], list[HeldPush]]:
        """The pushes these changes make, to their users' push subscriptions, and those of them
        the users' preferences hold for quiet hours (docs/push.md)."""
        # Only the pairs that had a push target when read (most changes have none).
        pairs = sorted({(e.change.user_id, e.change.app) for e in entries if e.pushable})
        if not pairs:
            return [], []
        now = self.clock()
        found: dict[tuple[str, str], list[Subscription]] = {}
        subs, prefs = await self.store.push_audience(pairs, now)
        for sub in subs:
            found.setdefault((sub.user_id, sub.app), []).append(sub)
        # As the store does across batches, a later change of a notification in this batch
        # supersedes the earlier ones (their pushes would only arrive after it on a retry);
        # if one of those made it new to the devices, the later one still alerts.
        latest: dict[tuple[str, str], int] = {}
        fresh: set[tuple[str, str]] = set()
        for e in entries:
            key = (e.change.user_id, e.change.notification_id)
            latest[key] = max(latest.get(key, 0), e.change.position)
            if e.change.kind is ChangeKind.CREATED or e.change.replaced:
                fresh.add(key)
        out: list[NewDelivery] = []
        held: list[HeldPush] = []
        for e in entries:
            key = (e.change.user_id, e.change.notification_id)
            pair = (e.change.user_id, e.change.app)
            targeted = found.get(pair)
            if not targeted or e.change.position < latest[key]:
                continue
            change = e.change
            if key in fresh and change.kind is ChangeKind.UPDATED:
                change = msgspec.structs.replace(change, replaced=True)
            made = targets.deliveries(change, targeted, now)
            wanted = prefs.get(pair)
            if wanted is None:  # no preferences: nothing to decide
                out.extend(made)
            else:
                _apply(wanted, list(made), targeted, now, out, held)
        return out, held

    async def remove(
        self,
        entries: list[Pending],
        before: asyncio.Future[None] | None,
        looked_up: asyncio.Future[None],
    ) -> None:
        """Work out the pushes of published entries, then delete the entries and queue their
        pushes. If that fails the entries stay, and are published again later: streams drop a
        position they have already sent. `before`: the previous batch's `looked_up`."""
        seqs = [entry.seq for entry in entries]
        try:
            if before is not None:
                await before
            no_pushes: tuple[list[NewDelivery], list[HeldPush]] = ([], [])
            deliveries, held = (
                await self.deliveries(entries) if self.pushed is not None else no_pushes
            )
            looked_up.set_result(None)  # the next batch's removal may go on: it is queued after
            await self.store.dispatched(seqs, deliveries, held)
            self.dispatched += len(seqs)
            self.metrics.dispatched.inc(len(seqs))
            if deliveries and self.pushed is not None:
                self.pushed({d.provider for d in deliveries})
        except HeraldError as exc:
            log.warning("outbox removal failed", extra={"error": exc.message})
        except Exception:  # a bug: the entries stay in the outbox
            log.exception("outbox removal failed")
        finally:
            if not looked_up.done():
                looked_up.set_result(None)
            self.removing.difference_update(seqs)


def _nothing() -> None:
    pass


def _apply(
    prefs: NotificationPreferences,
    made: list[NewDelivery],
    subs: list[Subscription],
    now: datetime,
    out: list[NewDelivery],
    held: list[HeldPush],
) -> None:
    """Send, drop or hold each push as the user's preferences say."""
    platform = {s.id: s.platform for s in subs}
    until = quiet_period_end(prefs, now)
    for d in made:
        decision = verdict(prefs, d.message, platform[d.subscription_id], until)
        if decision is Decision.SEND:
            out.append(d)
        elif decision is Decision.HOLD and until is not None:
            held.append(
                HeldPush(
                    subscription_id=d.subscription_id,
                    user_id=d.user_id,
                    app=d.app,
                    provider=d.provider.value,
                    notification_id=d.message.notification_id,
                    position=d.message.position,
                    expires=d.message.expires,
                    release=until,
                )
            )
