"""How the SQLite store writes puts: one `Put` job per call, and a run of them in one batch
written set-wise (a handful of statements for the whole run instead of four per notification).
A put with an Idempotency-Key records its answer in the same transaction."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from herald.model import ChangeKind, Notification
from herald.store.contract import Once, Remembered
from herald.store.revisions import Put, new_notification
from herald.store.rows import (
    NOTIFICATION_COLUMNS,
    REPLACED,
    from_micros,
    notification_from_row,
    notification_values,
    to_micros,
)
from herald.store.sqlite.appends import add_to_outbox, append, remove
from herald.store.sqlite.connection import Connection

CHUNK = 200  # keys per lookup statement in set-wise writes


@dataclass(slots=True)
class PutJob(Put):
    """A queued put as a write job: run alone (called), or written set-wise with its
    neighbours (`put_many`)."""

    def __call__(self, c: Connection) -> tuple[Notification, bool] | Remembered:
        once = self.once
        if once is not None:
            found = find_record(c, once.scope, once.key, to_micros(self.now))
            if found is not None:
                return found
        n, created = self._write(c)
        if once is None:
            return n, created
        answer = once.render(n, created)
        c.execute(RECORD_SQL, record_values(once, answer, self.now))
        return answer

    def _write(self, c: Connection) -> tuple[Notification, bool]:
        now = self.now.astimezone(UTC)
        at = to_micros(now)
        user_id, app, anid = self.user_id, self.app, self.content.app_notification_id
        old = None
        if anid is not None:
            found = c.execute(
                f"SELECT {NOTIFICATION_COLUMNS} FROM notifications"
                " WHERE user_id = ? AND app = ? AND app_notification_id = ?",
                (user_id, app, anid),
            ).fetchone()
            old = None if found is None else notification_from_row(found, from_micros)
        if old is not None and old.expiration_date_time <= now:
            remove(c, user_id, app, old.id, ChangeKind.EXPIRED, at)
            old = None
        n = new_notification(self, now, old)
        # A plain INSERT for a new row: a colliding id must fail, not overwrite another row.
        c.execute(INSERT_SQL if old is None else UPDATE_SQL, notification_values(n, to_micros))
        kind = ChangeKind.CREATED if old is None else REPLACED
        append(c, user_id, kind, app, n.id, at, self.origin)
        return n, old is None


def find_record(c: Connection, scope: str, key: str, at: int) -> Remembered | None:
    """The unexpired record of the key. In a write job, authoritative: the write lock is held
    (BEGIN IMMEDIATE), so no other process can add one before this transaction ends."""
    found = c.execute(_RECALL_SQL, (scope, key, at)).fetchone()
    return None if found is None else Remembered(found[0], found[1], bytes(found[2]), found[3])


def record_values(once: Once, answer: Remembered, now: datetime) -> tuple[object, ...]:
    return (
        once.scope,
        once.key,
        answer.fingerprint,
        answer.status,
        answer.body,
        answer.location,
        to_micros(once.expires),
        to_micros(now),
    )


_RECALL_SQL = (
    "SELECT fingerprint, status, body, location FROM idempotency"
    " WHERE scope = ? AND key = ? AND expires > ?"
)
# Keeps an unexpired record (the first answer); replaces an expired one the sweeper has not
# removed yet.
RECORD_SQL = (
    "INSERT INTO idempotency VALUES (?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (scope, key) DO UPDATE SET fingerprint = excluded.fingerprint,"
    " status = excluded.status, body = excluded.body, location = excluded.location,"
    " expires = excluded.expires WHERE idempotency.expires <= ?"
)


def put_many(c: Connection, puts: list[PutJob]) -> list[Any]:
    """Several puts with the semantics of running each `PutJob` in order, in ~5 statements (and
    one lookup per Idempotency-Key)."""
    live = _existing(c, puts)
    next_position = _next_positions(c, {p.user_id for p in puts})
    expired: list[tuple[str]] = []
    inserts: list[tuple[object, ...]] = []
    updates: list[tuple[object, ...]] = []
    changes: list[tuple[str, int, str, str, str, int, str | None]] = []
    records: list[tuple[object, ...]] = []
    answered: dict[tuple[str, str], Remembered] = {}  # keys recorded by this run
    results: list[Any] = []

    def log(
        user_id: str, kind: str, app: str, nid: str, at: int, origin: str | None = None
    ) -> None:
        position = next_position[user_id]
        next_position[user_id] = position + 1
        changes.append((user_id, position, str(kind), app, nid, at, origin))

    for p in puts:
        once = p.once
        if once is not None:
            found = answered.get((once.scope, once.key)) or find_record(
                c, once.scope, once.key, to_micros(p.now)
            )
            if found is not None:
                results.append(found)
                continue
        now = p.now.astimezone(UTC)
        at = to_micros(now)
        key = (p.user_id, p.app, p.content.app_notification_id or p.new_id)
        old = live.get(key) if p.content.app_notification_id is not None else None
        if old is not None and old.expiration_date_time <= now:
            expired.append((old.id,))
            log(p.user_id, ChangeKind.EXPIRED, p.app, old.id, at)
            old = None
        n = new_notification(p, now, old)
        (inserts if old is None else updates).append(notification_values(n, to_micros))
        kind = ChangeKind.CREATED if old is None else REPLACED
        log(p.user_id, kind, p.app, n.id, at, p.origin)
        live[key] = n
        if once is None:
            results.append((n, old is None))
            continue
        answer = answered[once.scope, once.key] = once.render(n, old is None)
        records.append(record_values(once, answer, p.now))
        results.append(answer)
    # Order matters: a key can be expired, then created, then replaced within one run.
    c.executemany("DELETE FROM notifications WHERE id = ?", expired)
    c.executemany(INSERT_SQL, inserts)
    c.executemany(UPDATE_SQL, updates)
    c.executemany(_LOG_SQL, changes)
    if records:
        c.executemany(RECORD_SQL, records)
    # One executemany (one prepared statement stepped per row, in C) is as set-wise as SQLite
    # gets: a multi-row VALUES saves ~0.3 us a row but is prepared again for every batch size.
    add_to_outbox(c, [(change[0], change[1]) for change in changes])
    return results


_LOG_SQL = (
    "INSERT INTO changes (user_id, position, kind, app, notification_id, at, origin)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)


def _existing(c: Connection, puts: list[PutJob]) -> dict[tuple[str, str, str], Notification]:
    keys = [
        (p.user_id, p.app, p.content.app_notification_id)
        for p in puts
        if p.content.app_notification_id is not None
    ]
    found: dict[tuple[str, str, str], Notification] = {}
    # OR of equalities, not a row-value IN (VALUES …): SQLite plans the latter as a table scan.
    # Chunked because each OR term deepens the expression tree (SQLite caps the depth at 1000).
    for start in range(0, len(keys), CHUNK):
        chunk = keys[start : start + CHUNK]
        where = " OR ".join(["(user_id = ? AND app = ? AND app_notification_id = ?)"] * len(chunk))
        rows = c.execute(
            f"SELECT {NOTIFICATION_COLUMNS} FROM notifications WHERE {where}",
            [v for key in chunk for v in key],
        ).fetchall()
        for r in rows:
            n = notification_from_row(r, from_micros)
            found[(n.user_id, n.app, n.app_notification_id)] = n
    return found


def _next_positions(c: Connection, users: set[str]) -> dict[str, int]:
    """Each user's next change position: max(log, pruned head) + 1, in one statement.

    One correlated max() per user: SQLite answers each from the end of the primary-key index
    (a GROUP BY over the users' rows would read every change they ever had).
    """
    rows = c.execute(_POSITIONS_SQL, (json.dumps(sorted(users)),)).fetchall()
    return {user_id: max(logged or 0, pruned or 0) + 1 for user_id, logged, pruned in rows}


_POSITIONS_SQL = (
    "SELECT u.value, (SELECT max(position) FROM changes WHERE user_id = u.value),"
    " (SELECT position FROM feed_heads WHERE user_id = u.value) FROM json_each(?) AS u"
)


# -- rows ------------------------------------------------------------------------------------

INSERT_SQL = (
    f"INSERT INTO notifications ({NOTIFICATION_COLUMNS})"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# Same parameter order as INSERT_SQL: (id, ...) -> "SET every column = ? WHERE id = ?".
UPDATE_SQL = (
    "UPDATE notifications SET ("
    + NOTIFICATION_COLUMNS
    + ") = (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) WHERE id = ?1"
)


def find_live(c: Connection, user_id: str, app: str, id: str, at: int) -> Notification | None:
    """The notification, unless it is absent or expired at `at`."""
    found = c.execute(
        f"SELECT {NOTIFICATION_COLUMNS} FROM notifications"
        " WHERE id = ? AND user_id = ? AND app = ? AND expiration_date_time > ?",
        (id, user_id, app, at),
    ).fetchone()
    return None if found is None else notification_from_row(found, from_micros)
