"""The PostgreSQL store's write transactions: what every one does first (lock the feed heads of
the users it touches, in one statement and in byte order of user id) and last (append its
changes with their outbox rows), and the `Op` calls that run in one.

The head locks serialise writers per user (several writer tasks, several Herald nodes) without
deadlocks, and positions are then allocated from those rows, so they commit gap-free and in
order. Outbox seqs come from a sequence, drawn after the head locks: per user, a later
transaction draws larger seqs (see 0002_devices.sql).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from herald.errors import HeraldError, Unavailable
from herald.model import ChangeKind, Pending
from herald.store.rows import CHANGE_COLUMNS

Outcomes = list[tuple[bool, Any]]


@dataclass(slots=True)
class Appended:
    """The outbox entries a batch of puts appended, as far as it knows them (`Outbox.on_outboxed`):
    `first`, ascending by seq, those that were their users' first left in the outbox; `whole`,
    whether they are all the batch appended."""

    first: list[Pending]
    whole: bool


# A batch step's answer: one outcome per call, and whether it appended changes (outbox rows):
# False, True, or the entries it knows (`Appended`, which is true).
Committed = tuple[Outcomes, bool | Appended]


@dataclass
class Tx:
    """One batch transaction: the locked heads and the changes to append at commit."""

    conn: asyncpg.Connection
    heads: dict[str, int]
    changes: list[tuple[str, int, str, str, str, datetime, str | None]] = field(
        default_factory=list
    )

    def append(
        self,
        user_id: str,
        kind: ChangeKind,
        app: str,
        nid: str,
        at: datetime,
        origin: str | None = None,
    ) -> None:
        self.heads[user_id] += 1
        self.changes.append((user_id, self.heads[user_id], kind.value, app, nid, at, origin))


@dataclass(slots=True)
class Op:
    """Any other write: `run` reads and writes through the transaction, checking before writing."""

    user_id: str | None
    run: Callable[[Tx], Awaitable[Any]]


async def run_ops(conn: asyncpg.Connection, ops: list[Op]) -> Committed:
    """Run the ops in one transaction; an op that raises before writing fails alone."""
    users = {op.user_id for op in ops if op.user_id is not None}
    async with conn.transaction():
        tx = Tx(conn, await lock_heads(conn, users))
        outcomes: Outcomes = []
        for op in ops:
            try:
                outcomes.append((True, await op.run(tx)))
            except HeraldError as e:  # raised before the op wrote anything
                outcomes.append((False, e))
        await append_changes(tx)
    return outcomes, bool(tx.changes)


async def probe(tx: Tx) -> None:
    """`ping`'s write probe: a transaction on a writer's connection, which must be writable."""
    if await tx.conn.fetchval("SELECT current_setting('transaction_read_only')::bool"):
        raise Unavailable("the database is read-only (a standby?)", retry_after=1)


async def lock_heads(conn: asyncpg.Connection, users: Iterable[str]) -> dict[str, int]:
    """Lock (creating if needed) the users' head rows in user id order; their current positions."""
    ordered = sorted(users)
    if not ordered:
        return {}
    rows = await conn.fetch(
        "INSERT INTO feed_heads (user_id)"
        " SELECT u FROM unnest($1::text[]) WITH ORDINALITY AS t(u, i) ORDER BY i"
        " ON CONFLICT (user_id) DO UPDATE SET position = feed_heads.position"
        " RETURNING user_id, position",
        ordered,
    )
    return {r[0]: int(r[1]) for r in rows}


async def append_changes(tx: Tx) -> None:
    """Append the transaction's changes, with their outbox rows, and move the heads past them."""
    if not tx.changes:
        return
    users, positions, kinds, apps, ids, ats, origins = zip(*tx.changes, strict=True)
    await tx.conn.execute(_APPEND_SQL, users, positions, kinds, apps, ids, ats, origins)
    touched = sorted({c[0] for c in tx.changes})
    await tx.conn.execute(
        "UPDATE feed_heads SET position = t.p FROM unnest($1::text[], $2::bigint[]) AS t(u, p)"
        " WHERE feed_heads.user_id = t.u",
        touched,
        [tx.heads[u] for u in touched],
    )


# The changes and their outbox rows in one statement. The sort runs below the outbox insert, so
# seqs are drawn in position order (and after the head locks this transaction holds).
_APPEND_SQL = (
    "WITH appended AS (INSERT INTO changes"
    f" (user_id, {', '.join(CHANGE_COLUMNS)})"
    " SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[],"
    " $6::timestamptz[], $7::text[]) RETURNING user_id, position)"
    " INSERT INTO outbox (user_id, position)"
    " SELECT user_id, position FROM appended ORDER BY user_id, position"
)
