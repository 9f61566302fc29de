"""The PostgreSQL store's epoch: which history of the database its data was written under, and
what is done when a connection finds itself on another one.

An asynchronous standby promoted after its primary failed lacks the primary's last commits; a
point-in-time restore lacks everything after its target. Positions come from `feed_heads` and the
app feed's seqs from a sequence, so Herald would hand out the lost changes' positions and seqs
again, for other changes: a device or app holding one would be told it is ahead of the feed, and
once new changes pass it, would skip them for good. Each such event starts a new history that
PostgreSQL tells apart: a promotion or a PITR restore starts a new timeline, a restore from
pg_dump a new cluster (system identifier) or at least a new database (its oid).

So every connection, before its first use (the pool's init), compares the live epoch with the one
stored in `store_epoch`. The first to find them different, under a lock and in one transaction,
moves every user's head and the app feed's sequence forward by `GAP`, records the skipped ranges
(`feed_voids`, `app_feed_voids`) and stores the new epoch; the others then find it equal. A
position or seq in a skipped range was issued, if at all, on the lost history: it is answered 410
(resync). A lossless promotion (a synchronous standby) changes the timeline too: then nobody holds
a skipped position and the move costs nothing but a jump in the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from herald.errors import Unavailable
from herald.store.postgres.schema import MIGRATION_TIMEOUT

# How far heads and the app feed's seqs move on a new history. Positions lost per user (and seqs
# lost in all) must be fewer than this to be recognised: a failover loses the replication lag's
# worth of commits, far below a million changes of one user; a device holding a position beyond
# the skipped range gets 400 (ahead of the feed) until the feed passes it. Positions are bigint:
# a million per failover never runs out.
GAP = 1_000_000


@dataclass(frozen=True, slots=True)
class Epoch:
    system_identifier: int
    database_oid: int
    timeline: int


@dataclass(frozen=True, slots=True)
class Found:
    """What a connection finds: the live epoch, the stored one (None before the first), whether
    any history change has been recorded (so skipped ranges exist), and whether this check
    recorded one (it moved the heads)."""

    live: Epoch
    stored: Epoch | None
    voided: bool
    moved: bool = False


# One check at a time per schema (several nodes connect at once after a failover).
_LOCK = "hashtext('herald-epoch:' || current_schema())"
# The live epoch (the timeline is the first 8 hex digits of the current WAL file's name; a standby
# has none until promoted) and the stored one.
_READ_SQL = (
    "SELECT s.system_identifier,"
    " (SELECT oid FROM pg_database WHERE datname = current_database())::bigint,"
    " CASE WHEN pg_is_in_recovery() THEN NULL"
    " ELSE pg_walfile_name(pg_current_wal_lsn()) END,"
    " e.system_identifier, e.database_oid, e.timeline, coalesce(e.moves, 0) > 0"
    " FROM pg_control_system() s LEFT JOIN store_epoch e ON true"
)
# Every head moves by $1, and the range each skips is recorded.
_MOVE_HEADS_SQL = (
    "WITH moved AS (UPDATE feed_heads SET position = position + $1 RETURNING user_id, position)"
    " INSERT INTO feed_voids (user_id, after, before)"
    " SELECT user_id, position - $1, position FROM moved"
)
# The newest seq the app feed has handed out on this history, or where the last move left it.
_LAST_SEQ_SQL = (
    "SELECT greatest((SELECT coalesce(max(seq), 0) FROM app_changes),"
    " (SELECT pruned FROM app_changes_horizon),"
    " (SELECT coalesce(max(before), 0) FROM app_feed_voids))"
)
_MOVE_SEQ_SQL = "SELECT setval(pg_get_serial_sequence('app_changes', 'seq'), $1)"
_STORE_SQL = (
    "INSERT INTO store_epoch (system_identifier, database_oid, timeline, changed, moves)"
    " VALUES ($1, $2, $3, now(), $4) ON CONFLICT (one) DO UPDATE SET"
    " system_identifier = $1, database_oid = $2, timeline = $3, changed = now(),"
    " moves = store_epoch.moves + $4"
)


async def read(conn: asyncpg.Connection) -> Found:
    row = await conn.fetchrow(_READ_SQL)
    assert row is not None
    if row[2] is None:
        # It cannot be checked, and a promotion would make it writable unchecked.
        raise Unavailable("the database is a standby (in recovery)", retry_after=1)
    live = Epoch(int(row[0]), int(row[1]), int(str(row[2])[:8], 16))
    stored = None if row[3] is None else Epoch(int(row[3]), int(row[4]), int(row[5]))
    return Found(live, stored, bool(row[6]))


async def check(conn: asyncpg.Connection) -> Found:
    """Make the stored epoch the live one, moving the heads first if it was another (the first
    epoch stored moves nothing: there is no history before it). Returns what is now stored."""
    found = await read(conn)
    if found.live == found.stored:
        return found
    async with conn.transaction():
        # Long bounds, as for a migration: another connection may be moving a million heads.
        await conn.execute(f"SELECT pg_advisory_xact_lock({_LOCK})", timeout=MIGRATION_TIMEOUT)
        found = await read(conn)  # another connection may have done it meanwhile
        if found.live == found.stored:
            return found
        moved = found.stored is not None
        if moved:
            await move(conn)
        e = found.live
        await conn.execute(_STORE_SQL, e.system_identifier, e.database_oid, e.timeline, int(moved))
    return Found(found.live, found.live, found.voided or moved, moved)


async def move(conn: asyncpg.Connection) -> None:
    """Skip `GAP` positions of every user and `GAP` seqs of the app feed (in a transaction)."""
    # Connections wait for this check before their first use, so nothing else writes now; the
    # locks keep out anything that did not (reads go on): writers, the feed's stamper and pruner.
    await conn.execute(
        "LOCK TABLE feed_heads, app_changes IN EXCLUSIVE MODE", timeout=MIGRATION_TIMEOUT
    )
    await conn.execute(_MOVE_HEADS_SQL, GAP, timeout=MIGRATION_TIMEOUT)
    last = int(await conn.fetchval(_LAST_SEQ_SQL))
    await conn.execute("INSERT INTO app_feed_voids VALUES ($1, $2)", last, last + GAP)
    await conn.execute(_MOVE_SEQ_SQL, last + GAP)
