"""How the PostgreSQL store writes puts, the hot path: all puts of a call go to the server-side
function `herald_put_batch` (functions/herald_put_batch.sql) as one statement outside an
explicit transaction, i.e. one round trip and its own transaction. Puts with Idempotency-Keys
are written in a transaction with their records."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec

from herald.errors import HeraldError, Unavailable
from herald.model import Change, ChangeKind, Notification, Pending
from herald.store.contract import Remembered
from herald.store.postgres.transaction import Appended, Committed, Outcomes
from herald.store.revisions import Put, new_notification
from herald.store.rows import encode_content

# Rounds of a batch with Idempotency-Keys that other transactions recorded first (each round
# takes those puts out). Two nodes racing on many keys at once can each roll the other back
# several times (a CI run saw 4 rounds run out: 503 for a same-key pair split over two nodes);
# a round costs only a rolled-back transaction, so allow many before answering 503.
RECORD_ROUNDS = 16

log = logging.getLogger("herald.store")


_PUT_BATCH_SQL = (
    "SELECT o_ord, o_id, o_version, o_created_at, o_created, o_position, o_seq, o_pushable,"
    " o_first FROM herald_put_batch($1::text[],"
    " $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],"
    " $8::timestamptz[], $9::timestamptz[], $10::bytea[], $11::text[], $12::boolean)"
)
# Calls of at most this many puts answer their outbox entries for the dispatcher, if asked
# (`put_batch`'s `entries`). Posts that trickle in come in calls of 1-3 (1,000 posts/s: 97 %
# of calls); a larger call is load, which the dispatcher reads in bulk anyway, and the answer
# cost a call of 3 puts 20 % more time in PostgreSQL (docs/performance.md).
FEW = 4


async def put_batch(
    conn: asyncpg.Connection, puts: list[Put], again: bool = False, entries: bool = False
) -> Committed:
    """All puts of a call in one statement (its own transaction): `herald_put_batch`; with
    Idempotency-Keys, in a transaction with their records (`_put_recorded`).

    `again`: an earlier call of the same batch may have created a key equal to a put's new id,
    so puts without an appNotificationId look their key up too (and replace what they find)."""
    for p in puts:
        if p.once is not None:
            return await _put_recorded(conn, puts, again, entries)
    return await _put_rows(conn, puts, again, entries)


class _Redo(Exception):
    """Rolls a keyed batch back, to run it again without these puts (by index), settled so:
    keys another transaction recorded first, answers that could not be rendered."""

    def __init__(self, taken: list[int], failed: dict[int, tuple[bool, Any]]) -> None:
        super().__init__(f"{len(taken)} Idempotency-Keys taken, {len(failed)} failed")
        self.taken = taken
        self.failed = failed


async def _put_recorded(
    conn: asyncpg.Connection, puts: list[Put], again: bool, entries: bool
) -> Committed:
    """Puts and the records of their Idempotency-Keys in one transaction (three round trips
    more than `_put_rows` alone, paid only by batches with a key).

    A key another transaction recorded first (another process or node: the insert waits for it
    to end) rolls the whole transaction back; that put is answered with the record, and the
    others run again without it. So does an answer that cannot be rendered (that put fails)."""
    settled: dict[int, tuple[bool, Any]] = {}
    for _ in range(RECORD_ROUNDS):
        rest = [i for i in range(len(puts)) if i not in settled]
        if not rest:
            return [settled[i] for i in range(len(puts))], False
        try:
            async with conn.transaction():
                outcomes, appended = await _put_rows(conn, [puts[i] for i in rest], again, entries)
                answers = _rendered([puts[i] for i in rest], outcomes)
                failed = {rest[j]: a for j, a in enumerate(answers) if isinstance(a, tuple)}
                taken = await _record(conn, [puts[i] for i in rest], answers)
                if taken or failed:
                    raise _Redo([rest[j] for j in taken], failed)
        except _Redo as redo:
            settled |= redo.failed
            recorded = await _recall_taken(conn, puts, redo.taken)
            settled |= {i: (True, r) for i, r in recorded.items()}
            continue
        by_rest = dict(zip(rest, zip(outcomes, answers, strict=True), strict=True))
        merged: Outcomes = []
        for i in range(len(puts)):
            outcome, answer = by_rest[i] if i in by_rest else (settled[i], None)
            merged.append((True, answer) if isinstance(answer, Remembered) else outcome)
        return merged, appended
    raise Unavailable("Idempotency-Keys kept changing hands; try again", retry_after=1)


def _rendered(puts: list[Put], outcomes: Outcomes) -> list[Remembered | tuple[bool, Any] | None]:
    """Each keyed put's answer, rendered from the notification as written (in the transaction);
    a failed outcome where it could not be."""
    answers: list[Remembered | tuple[bool, Any] | None] = []
    for p, (ok, value) in zip(puts, outcomes, strict=True):
        if p.once is None or not ok:
            answers.append(None)
            continue
        try:
            answers.append(p.once.render(*value))
        except Exception as e:
            log.exception("could not render an idempotent answer")
            answers.append((False, HeraldError(f"could not render the answer: {e!r}")))
    return answers


async def _record(
    conn: asyncpg.Connection, puts: list[Put], answers: list[Remembered | tuple[bool, Any] | None]
) -> list[int]:
    """Insert the answers as the keys' records; the positions (in `puts`) of the keys another
    transaction holds an unexpired record of."""
    rows = [
        (j, p.once, a)
        for j, (p, a) in enumerate(zip(puts, answers, strict=True))
        if p.once is not None and isinstance(a, Remembered)
    ]
    if not rows:
        return []
    now = min(puts[j].now for j, _, _ in rows)
    inserted = await conn.fetch(
        _RECORD_SQL,
        [once.scope for _, once, _ in rows],
        [once.key for _, once, _ in rows],
        [a.fingerprint for _, _, a in rows],
        [a.status for _, _, a in rows],
        [a.body for _, _, a in rows],
        [a.location for _, _, a in rows],
        [once.expires for _, once, _ in rows],
        now,
    )
    stored = {(r[0], r[1]) for r in inserted}
    return [j for j, once, _ in rows if (once.scope, once.key) not in stored]


async def _recall_taken(
    conn: asyncpg.Connection, puts: list[Put], taken: list[int]
) -> dict[int, Remembered]:
    """The records that took these puts' keys (committed: the insert waited for them). One that
    has expired or been swept meanwhile is missing, and its put runs again."""
    if not taken:
        return {}
    keys = [(i, puts[i].once) for i in taken]
    found = await conn.fetch(
        "SELECT i.n, r.fingerprint, r.status, r.body, r.location"
        " FROM unnest($1::text[], $2::text[], $3::int[]) AS i(scope, key, n)"
        " JOIN idempotency r ON r.scope = i.scope AND r.key = i.key AND r.expires > $4",
        [once.scope for _, once in keys if once],
        [once.key for _, once in keys if once],
        [i for i, once in keys if once],
        min(puts[i].now for i in taken),
    )
    return {r[0]: Remembered(r[1], r[2], bytes(r[3]), r[4]) for r in found}


# Keeps an unexpired record (the first answer): a conflicting row is locked and not returned.
# Replaces an expired one the sweeper has not removed yet.
_RECORD_SQL = (
    "INSERT INTO idempotency (scope, key, fingerprint, status, body, location, expires)"
    " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int[], $5::bytea[],"
    " $6::text[], $7::timestamptz[])"
    " ON CONFLICT (scope, key) DO UPDATE SET fingerprint = excluded.fingerprint,"
    " status = excluded.status, body = excluded.body, location = excluded.location,"
    " expires = excluded.expires WHERE idempotency.expires <= $8"
    " RETURNING scope, key"
)


async def _put_rows(
    conn: asyncpg.Connection, puts: list[Put], again: bool, entries: bool
) -> Committed:
    """`herald_put_batch` over the puts; with `entries` (and at most `FEW` puts), the entries it
    appended as `Appended`."""
    # As if created; replaced rows are patched below.
    built = [new_notification(p, p.now.astimezone(UTC), None) for p in puts]
    asked = entries and len(puts) <= FEW
    rows = await conn.fetch(
        _PUT_BATCH_SQL,
        [p.user_id for p in puts],
        [p.app for p in puts],
        [p.content.app_notification_id or (p.new_id if again else None) for p in puts],
        [p.new_id for p in puts],
        [n.target_host_name for n in built],
        [n.group_name for n in built],
        [n.priority.value for n in built],
        [n.last_modified_date_time for n in built],
        [n.expiration_date_time for n in built],
        [encode_content(n) for n in built],
        [p.origin for p in puts],
        asked,
    )
    outcomes: list[tuple[bool, Any] | None] = [None] * len(puts)
    described: list[tuple[Pending, bool]] = []
    held_back: set[str] = set()  # users with a change the function did not describe
    for ordinal, id, version, created_at, created, position, seq, pushable, first in rows:
        p, n = puts[ordinal - 1], built[ordinal - 1]
        if not created:
            n = msgspec.structs.replace(n, id=id, version=version, created_date_time=created_at)
        outcomes[ordinal - 1] = (True, (n, created))
        if not asked:
            continue
        if seq is None:
            held_back.add(p.user_id)
        else:
            described.append((Pending(seq, _change(p, n, position, created), pushable), first))
    # Cannot happen (the function answers every put). Not an exception: the call has committed,
    # and a retry of its puts would apply them twice.
    missing = (False, HeraldError("herald_put_batch did not answer this put"))
    answered = [missing if o is None else o for o in outcomes]
    if not rows or not asked:
        return answered, bool(rows)
    # A user's entries of this call go together: one left out (EXPIRED logged first) keeps the
    # user's later ones from being published ahead of it.
    described.sort(key=lambda e: e[0].seq)
    first = [e for e, is_first in described if is_first and e.change.user_id not in held_back]
    return answered, Appended(first, whole=not held_back and len(first) == len(described))


def _change(p: Put, n: Notification, position: int, created: bool) -> Change:
    """The change a put logged, as `Outbox.pending` reads it back (the notification as it is now:
    none once expired)."""
    return Change(
        user_id=p.user_id,
        position=position,
        kind=ChangeKind.CREATED if created else ChangeKind.UPDATED,
        replaced=not created,
        app=p.app,
        notification_id=n.id,
        at=n.last_modified_date_time,
        origin=p.origin,
        notification=n if n.expiration_date_time > datetime.now(UTC) else None,
    )


async def put_again(conn: asyncpg.Connection, puts: list[Put], entries: bool = False) -> Committed:
    return await put_batch(conn, puts, again=True, entries=entries)
