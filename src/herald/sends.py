"""The background runner of sends to many users (docs/api.md "Audiences").

A send is stored whole before its request is answered (`store.Audiences.start_send`). This
runner creates its recipients' notifications in batches: each recipient's through
`Notifications.put_once`, the writer path of `POST …/notifications` (same change rows, outbox
entries and live delivery), so a batch's puts are group-committed with whatever else is being
written. Then the progress is recorded.

Exactly once per recipient: each put carries an idempotency record keyed by (send, user), in the
put's transaction. A batch redone after a crash (its puts committed, its progress not) finds
those records and writes nothing again.

Several nodes: a send belongs to the dispatch shard of its id (`store.Shards`, leased by
`outbound/leases.py`), so one node at a time runs it. A node works on a send for at most
`SLICE_SECONDS` before it lists its sends again, well within a lease, so a send whose shard moved
is left to its new owner.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Protocol

import msgspec

from herald.errors import HeraldError
from herald.feed import Clock, new_id
from herald.model import Content, Notification
from herald.outbound.leases import Leases
from herald.store import (
    SHARDS,
    Audiences,
    Directory,
    Failure,
    Notifications,
    Once,
    Outbox,
    Remembered,
)
from herald.store.contract import Send
from herald.store.schema import SEND_SCOPE
from herald.users import canonical, is_principal_name, principal_name

log = logging.getLogger("herald.sends")

POLL_SECONDS = 1.0  # sends accepted by other nodes are found this late at most
SLICE_SECONDS = 1.0
LIST_LIMIT = 16
# How long a recipient's record stays: a send left unfinished longer could repeat a recipient.
RECORD_TTL = timedelta(days=30)
BACKLOG_WAIT = 2.0
BACKLOG_POLL = 0.005
RUNNING, SUCCEEDED, FAILED = "running", "succeeded", "failed"


class SendsStore(Audiences, Notifications, Directory, Outbox, Protocol):
    """What the runner needs of the store."""


def scope_of(send_id: str) -> str:
    """The idempotency scope of a send's recipients (`SEND_SCOPE`)."""
    return f"{SEND_SCOPE}{send_id}"


class Sends:
    def __init__(
        self,
        store: SendsStore,
        clock: Clock,
        batch: int,
        pause: float = 0.0,
        leases: Leases | None = None,
        backlog_wait: float = BACKLOG_WAIT,
    ) -> None:
        self.store = store
        self.clock = clock
        self.batch = batch
        self.pause = pause
        self.leases = leases
        self.backlog_wait = backlog_wait
        self.woken = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        """A send was accepted here: start on it now rather than at the next poll."""
        self.woken.set()

    def start(self) -> None:
        self.task = asyncio.create_task(self.run(), name="herald.sends")

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None

    def shards(self) -> frozenset[int] | None:
        """The shards whose sends this node runs: None for all."""
        if self.leases is None:
            return None
        held = self.leases.shards()
        return None if len(held) == SHARDS else held

    async def run(self) -> None:
        while True:
            self.woken.clear()
            busy = False
            try:
                busy = await self.step()
            except HeraldError as exc:  # the store is unavailable: the send resumes later
                log.warning("send paused", extra={"error": exc.message})
            if not busy:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(POLL_SECONDS):
                        await self.woken.wait()

    async def step(self) -> bool:
        """Advance each unfinished send of this node's shards for a while; whether any was."""
        shards = self.shards()
        if shards is not None and not shards:
            return False
        sends = await self.store.unfinished_sends(LIST_LIMIT, shards)
        deadline = time.monotonic() + SLICE_SECONDS
        for send in sends:
            await self.advance(send, deadline)
        return bool(sends)

    async def advance(self, send: Send, deadline: float) -> None:
        """Batches of the send until it is finished or `deadline` (monotonic) has passed."""
        content = msgspec.msgpack.decode(send.content, type=Content)
        done, failed = send.done, send.failed
        while True:
            users = await self.store.send_recipients(send.id, done, self.batch)
            if not users:  # the send is gone (its app was deleted)
                return
            failures = await self._batch(send, content, users)
            done += len(users)
            failed += len(failures)  # (a redone batch's failures count once in the store)
            status = RUNNING
            if done >= send.total:
                status = FAILED if send.total and failed >= send.total else SUCCEEDED
            await self.store.send_progress(send.id, done, failures, status, self.clock())
            if status != RUNNING or time.monotonic() >= deadline:
                return
            # Let the other work of the process in between batches, and the dispatcher catch up.
            await asyncio.sleep(self.pause)
            await self.backlog()

    async def backlog(self) -> None:
        """Wait (up to `backlog_wait` s) until less than a batch of changes waits in the outbox.

        The outbox is drained oldest first: a change another user's post makes while a send runs
        waits behind every entry of the send still there. Keeping that queue under a batch keeps
        its wait short; the bound keeps a send going when dispatch lags elsewhere (another node's
        shards, a dispatcher that cannot write)."""
        deadline = time.monotonic() + self.backlog_wait
        while await self.store.waiting(self.batch) >= self.batch:
            if time.monotonic() >= deadline:
                return
            await asyncio.sleep(BACKLOG_POLL)

    async def _batch(self, send: Send, content: Content, users: list[str]) -> list[Failure]:
        """Put the notification of each user (all at once: the writer commits them together)."""
        outcomes = await asyncio.gather(*(self._one(send, content, u) for u in users))
        return [f for f in outcomes if f is not None]

    async def _one(self, send: Send, content: Content, user: str) -> Failure | None:
        user_id = canonical(user)
        if is_principal_name(user):
            found = await self.store.user_of(principal_name(user))
            if found is None:
                return Failure(user, "userNotFound", f"No user has the principal name '{user}'.")
            user_id = found
        now = self.clock()
        if content.expiration_date_time <= now:
            return Failure(user, "expired", "The notification expired before it was sent.")
        once = Once(scope_of(send.id), user_id, send.id, now + RECORD_TTL, _record(send.id))
        await self.store.put_once(user_id, send.app, content, new_id(), now, once)
        return None


def _record(send_id: str) -> Callable[[Notification, bool], Remembered]:
    """A recipient's idempotency record: its notification's id."""

    def render(n: Notification, created: bool) -> Remembered:
        return Remembered(send_id, 201, n.id.encode())

    return render
