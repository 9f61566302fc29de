"""Per-user cursors: this node's listeners get each user's changes once and in position order,
whatever a lossy transport (Redis pub/sub) loses, duplicates or reorders.

Positions are per user, gap-free, across apps (`model.Change`), so a node that receives every
change of a user (whatever the app) sees a lost one as a gap. Each user with a listener here
has a cursor: `seen`, the position up to which every change has gone to this node's listeners
(or lies at or below their own position, `Listener.sent`, so they would drop it). A change at
`seen + 1` is delivered at once; one at or below `seen` is dropped (a duplicate: the echo of a
change two dispatchers published, or one a fill read first); one further ahead waits, with the
others ahead, for up to `GRACE` (a change from another publisher may be on its way), then the
gap is read from the change log (`ChangeLog.changes`), which is the truth.

A lost tail (no later change shows the gap) is found by `reconcile`, which compares every
user's newest position (`ChangeLog.heads`, one read for all the users here) with its cursor;
the transport calls it after it reconnects and periodically (`broker/redis.py`).

A new cursor starts at the first listener's own position (its resume position, never past the
newest one when it listened): starting from the newest position read later would skip a change
committed between the listener's registration and that read whose message was lost, and the
listener's replay may have read the log before it committed. Its first fill waits for the
listeners' replay to end (`settle`), then starts where they are.
"""

from __future__ import annotations

import asyncio
import logging

from herald.broker.base import Listener
from herald.model import Change
from herald.store.contract import ChangeLog

log = logging.getLogger("herald.broker")

# How long a change ahead of the next position waits for the ones before it (two dispatchers'
# messages interleave) before the gap is read from the change log.
GRACE = 0.02
FILL_BATCH = 500
# Changes held ahead of a gap; past this they are dropped (the fill reads them from the log).
MAX_AHEAD = 1000
RETRY_SECONDS = 0.5
# A new cursor's first fill waits until its listeners' positions stop moving (a resumed stream
# replaying the log moves its position with every change it sends), up to SETTLE_LIMIT.
SETTLE_TICK = 0.05
SETTLE_LIMIT = 2.0
HEADS_BATCH = 1000  # users per `ChangeLog.heads` read


class Cursor:
    """One user's: where this node's listeners have got to, and what waits behind a gap."""

    __slots__ = ("apps", "ahead", "filler", "fresh", "seen", "user", "wanted")

    def __init__(self, user: str, seen: int) -> None:
        self.user = user
        self.seen = seen
        self.fresh = True  # `seen` is still its first listener's resume position
        self.wanted = seen  # the newest position known to exist (from `reconcile`)
        self.apps: dict[str, list[Listener]] = {}
        self.ahead: dict[int, Change] = {}
        self.filler: asyncio.Task[None] | None = None

    def floor(self) -> int:
        """The lowest position any listener here has: nothing at or below it is needed."""
        return min(listener.sent for listeners in self.apps.values() for listener in listeners)

    def behind(self) -> bool:
        return bool(self.ahead) or self.wanted > self.seen

    def positions(self) -> list[int]:
        return [listener.sent for listeners in self.apps.values() for listener in listeners]


class Cursors:
    """The cursors of the users with a listener on this node, and those listeners."""

    def __init__(self, log: ChangeLog) -> None:
        self.log = log
        self.users: dict[str, Cursor] = {}
        self.gaps = 0  # gaps read from the change log
        self.filled = 0  # changes delivered from the change log rather than the transport

    # -- listeners ---------------------------------------------------------------------------
    def listen(self, user_id: str, app: str, listener: Listener) -> None:
        cursor = self.users.get(user_id)
        if cursor is None:
            cursor = self.users[user_id] = Cursor(user_id, listener.sent)
        # An existing cursor's `seen` is at most the newest position now (only committed changes
        # advance it), so the new listener gets everything after the moment it listened.
        cursor.apps.setdefault(app, []).append(listener)

    def unlisten(self, user_id: str, app: str, listener: Listener) -> None:
        cursor = self.users.get(user_id)
        listeners = cursor.apps.get(app) if cursor is not None else None
        if cursor is None or listeners is None:
            return
        try:
            listeners.remove(listener)
        except ValueError:
            return
        if not listeners:
            del cursor.apps[app]
        if not cursor.apps:
            del self.users[user_id]
            if cursor.filler is not None:
                cursor.filler.cancel()

    def listeners(self, user_id: str, app: str) -> tuple[Listener, ...]:
        cursor = self.users.get(user_id)
        return tuple(cursor.apps.get(app, ())) if cursor is not None else ()

    def count(self) -> int:
        return sum(len(ls) for c in self.users.values() for ls in c.apps.values())

    def clear(self) -> None:
        for cursor in self.users.values():
            if cursor.filler is not None:
                cursor.filler.cancel()
        self.users.clear()

    # -- changes -----------------------------------------------------------------------------
    def offer(self, change: Change) -> None:
        """A change from the transport (or this node's own dispatcher), in any order, maybe
        twice."""
        cursor = self.users.get(change.user_id)
        if cursor is None or change.position <= cursor.seen:
            return
        if change.position == cursor.seen + 1:
            self.advance(cursor, change)
            self.drain(cursor)
            return
        if len(cursor.ahead) < MAX_AHEAD:
            cursor.ahead[change.position] = change
        self.fill(cursor, GRACE)

    def advance(self, cursor: Cursor, change: Change) -> None:
        cursor.seen = change.position
        cursor.fresh = False
        # A copy: a listener may unlisten while it is delivered to (it closes on delivery).
        for listener in tuple(cursor.apps.get(change.app, ())):
            if change.position <= listener.sent:
                continue  # it has it already (its replay read it)
            try:
                listener.deliver(change)
            except Exception:  # one broken stream must not starve the others
                log.exception("listener failed", extra={"user": change.user_id})

    def drain(self, cursor: Cursor) -> None:
        """Deliver what waited ahead and is next now."""
        while cursor.ahead:
            change = cursor.ahead.pop(cursor.seen + 1, None)
            if change is None:
                for position in [p for p in cursor.ahead if p <= cursor.seen]:
                    del cursor.ahead[position]
                return
            self.advance(cursor, change)

    def fill(self, cursor: Cursor, delay: float) -> None:
        if cursor.filler is None:
            cursor.filler = asyncio.get_running_loop().create_task(self.filling(cursor, delay))

    async def filling(self, cursor: Cursor, delay: float) -> None:
        """Read the gap from the change log once `delay` has not closed it; retry while the
        store fails."""
        try:
            await asyncio.sleep(delay)
            if cursor.fresh:
                await self.settle(cursor)
            while self.users.get(cursor.user) is cursor and cursor.behind():
                try:
                    await self.read(cursor)
                except Exception as exc:  # the store is unavailable: the gap waits for it
                    log.warning(
                        "could not fill a gap from the change log",
                        extra={"user": cursor.user, "error": str(exc)},
                    )
                    await asyncio.sleep(RETRY_SECONDS)
        finally:
            if cursor.filler is asyncio.current_task():
                cursor.filler = None

    async def settle(self, cursor: Cursor) -> None:
        """Wait for a new cursor's listeners to finish replaying.

        A new cursor starts at its first listener's resume position, so its first gap spans
        whatever that listener replays from the log itself. Filled at once, the fill would race
        the replay and pile the same changes into the listener's backlog (a stream cuts a
        client off past `MAX_BACKLOG`); once the replay is over, the listener's position is
        where the fill starts (`Cursor.floor`). Live changes wait meanwhile (`ahead`)."""
        positions = cursor.positions()
        deadline = asyncio.get_running_loop().time() + SETTLE_LIMIT
        while asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(SETTLE_TICK)
            if self.users.get(cursor.user) is not cursor:
                return
            now = cursor.positions()
            if now == positions:
                break
            positions = now
        cursor.fresh = False

    async def read(self, cursor: Cursor) -> None:
        """One batch of the change log after `seen`, delivered in order."""
        # Listeners that replayed past `seen` need nothing at or below their position.
        cursor.seen = max(cursor.seen, cursor.floor())
        self.drain(cursor)
        if not cursor.behind():
            return
        self.gaps += 1
        changes = await self.log.changes(cursor.user, None, cursor.seen, FILL_BATCH)
        if self.users.get(cursor.user) is not cursor:
            return  # its last listener left meanwhile
        for change in changes:
            if change.position > cursor.seen:  # the transport may have delivered it meanwhile
                self.filled += 1
                self.advance(cursor, change)
        self.drain(cursor)
        if not changes and cursor.behind():
            # The log has nothing after `seen`: what is ahead was pruned in between (or the
            # head read was of an older store). Deliver what is held, in order, and go on.
            for position in sorted(cursor.ahead):
                self.advance(cursor, cursor.ahead.pop(position))
            # Nor will it ever have anything up to `wanted` (the head, read before the log):
            # positions the head skipped (a new history, `store/postgres/epoch.py`; an app's
            # deleted changes) are never issued, so the next reconcile must not read them again.
            cursor.seen = max(cursor.seen, cursor.wanted)
            cursor.wanted = cursor.seen

    async def reconcile(self) -> int:
        """Compare every user's newest position with its cursor and fill what is missing (a
        lost tail, or everything while the transport is down). Returns the users behind."""
        users = list(self.users)
        behind = 0
        for start in range(0, len(users), HEADS_BATCH):
            heads = await self.log.heads(users[start : start + HEADS_BATCH])
            for user, head in heads.items():
                cursor = self.users.get(user)
                if cursor is not None and head > cursor.seen:
                    cursor.wanted = max(cursor.wanted, head)
                    behind += 1
                    self.fill(cursor, GRACE)  # its message may be on its way
        return behind
