"""Appending to the change log inside a write: every change gets the user's next position and an
outbox entry, in the write's transaction (the single writer holds the database lock, so positions
are gap-free)."""

from __future__ import annotations

from herald.model import ChangeKind
from herald.store.rows import CHANGE_COLUMNS
from herald.store.sqlite.connection import Connection


def append(
    c: Connection,
    user_id: str,
    kind: str,
    app: str,
    nid: str,
    at: int,
    origin: str | None = None,
) -> None:
    """Append one change at the user's next position (the writer holds the database lock).
    `kind`: a ChangeKind, or REPLACED."""
    (position,) = c.execute(
        APPEND_SQL, (user_id, user_id, user_id, str(kind), app, nid, at, origin)
    ).fetchone()
    add_to_outbox(c, [(user_id, position)])


# max(log, pruned head) + 1: gap-free because the single writer holds the database lock.
APPEND_SQL = (
    f"INSERT INTO changes (user_id, {', '.join(CHANGE_COLUMNS)}) VALUES (?, 1 + max("
    "coalesce((SELECT max(position) FROM changes WHERE user_id = ?), 0),"
    " coalesce((SELECT position FROM feed_heads WHERE user_id = ?), 0)), ?, ?, ?, ?, ?)"
    " RETURNING position"
)


def add_to_outbox(c: Connection, entries: list[tuple[str, int]]) -> None:
    """Outbox rows for changes just appended, in position order: the rowids they get ascend."""
    c.executemany("INSERT INTO outbox (user_id, position) VALUES (?, ?)", entries)
    c.outboxed += len(entries)


def remove(
    c: Connection,
    user_id: str,
    app: str,
    nid: str,
    kind: ChangeKind,
    at: int,
    origin: str | None = None,
) -> None:
    """Delete a notification and append its tombstone (`kind`: DELETED or EXPIRED)."""
    c.execute("DELETE FROM notifications WHERE id = ?", (nid,))
    append(c, user_id, kind, app, nid, at, origin)
