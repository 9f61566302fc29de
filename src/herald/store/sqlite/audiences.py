"""SQLite: audiences and sends to many users (`Audiences`)."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

from herald.errors import Conflict, NotFound, QuotaExceeded
from herald.store.contract import Audience, Audiences, Failure, Send
from herald.store.rows import from_micros, to_micros
from herald.store.sqlite.connection import Connection
from herald.store.sqlite.database import SqliteDatabase

_AUDIENCE_SQL = (
    "SELECT a.app, a.id, a.display_name, a.created, (SELECT count(*) FROM audience_members m"
    " WHERE m.app = a.app AND m.audience = a.id) FROM audiences a"
)
_SEND_COLUMNS = (
    "id, app, idempotency_key, fingerprint, audience, content, total, done, failed, status,"
    " created, last_action, finished"
)


class SqliteAudiences(SqliteDatabase, Audiences):
    async def put_audience(
        self, app: str, id: str, display_name: str | None, limit: int, now: datetime
    ) -> Audience:
        def job(c: Connection) -> Audience:
            (count,) = c.execute("SELECT count(*) FROM audiences WHERE app = ?", (app,)).fetchone()
            if c.execute("SELECT 1 FROM audiences WHERE app = ? AND id = ?", (app, id)).fetchone():
                raise Conflict(f"The audience '{id}' already exists.")
            if count >= limit:
                raise QuotaExceeded(f"An app may have at most {limit} audiences.")
            c.execute(
                "INSERT INTO audiences VALUES (?, ?, ?, ?)", (app, id, display_name, to_micros(now))
            )
            return Audience(app, id, display_name, now, 0)

        return await self._write(job)

    async def get_audience(self, app: str, id: str) -> Audience | None:
        row = await self._read(
            lambda c: c.execute(
                f"{_AUDIENCE_SQL} WHERE a.app = ? AND a.id = ?", (app, id)
            ).fetchone()
        )
        return None if row is None else _audience(row)

    async def list_audiences(self, app: str) -> list[Audience]:
        rows = await self._read(
            lambda c: c.execute(f"{_AUDIENCE_SQL} WHERE a.app = ? ORDER BY a.id", (app,)).fetchall()
        )
        return [_audience(r) for r in rows]

    async def delete_audience(self, app: str, id: str) -> bool:
        def job(c: Connection) -> bool:
            c.execute("DELETE FROM audience_members WHERE app = ? AND audience = ?", (app, id))
            return (
                c.execute("DELETE FROM audiences WHERE app = ? AND id = ?", (app, id)).rowcount > 0
            )

        return await self._write(job)

    async def add_members(self, app: str, id: str, users: Sequence[str], limit: int) -> int:
        def job(c: Connection) -> int:
            count = _members(c, app, id)
            before = c.total_changes
            c.executemany(
                "INSERT INTO audience_members VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                [(app, id, u) for u in users],
            )
            added = c.total_changes - before
            if count + added > limit:  # the writer rolls the job back
                raise QuotaExceeded(f"An audience may have at most {limit} members.")
            return added

        return await self._write(job)

    async def remove_members(self, app: str, id: str, users: Sequence[str]) -> int:
        def job(c: Connection) -> int:
            _members(c, app, id)
            before = c.total_changes
            c.executemany(
                "DELETE FROM audience_members WHERE app = ? AND audience = ? AND user_id = ?",
                [(app, id, u) for u in users],
            )
            return c.total_changes - before

        return await self._write(job)

    async def members(self, app: str, id: str, after: str | None, limit: int) -> list[str]:
        def job(c: Connection) -> list[str]:
            if not c.execute(
                "SELECT 1 FROM audiences WHERE app = ? AND id = ?", (app, id)
            ).fetchone():
                raise NotFound(f"The audience '{id}' was not found.")
            rows = c.execute(
                "SELECT user_id FROM audience_members WHERE app = ? AND audience = ?"
                " AND user_id > ? ORDER BY user_id LIMIT ?",
                (app, id, after or "", limit),
            ).fetchall()
            return [r[0] for r in rows]

        return await self._read(job)

    async def start_send(
        self, send: Send, recipients: Sequence[str] | None, limit: int
    ) -> tuple[Send, bool]:
        def job(c: Connection) -> tuple[Send, bool]:
            if send.idempotency_key is not None:
                row = c.execute(
                    f"SELECT {_SEND_COLUMNS} FROM sends WHERE app = ? AND idempotency_key = ?",
                    (send.app, send.idempotency_key),
                ).fetchone()
                if row is not None:
                    return _send(row), False
            total = len(recipients) if recipients is not None else 0
            if recipients is None:
                assert send.audience is not None
                total = _members(c, send.app, send.audience)
                if total > limit:
                    raise QuotaExceeded(f"A send may reach at most {limit} users.")
            stored = replace(send, total=total)
            c.execute(
                f"INSERT INTO sends ({_SEND_COLUMNS}) VALUES ({', '.join('?' * 13)})",
                _send_values(stored),
            )
            if recipients is None:
                c.execute(
                    "INSERT INTO send_recipients SELECT ?,"
                    " row_number() OVER (ORDER BY user_id) - 1, user_id"
                    " FROM audience_members WHERE app = ? AND audience = ?",
                    (send.id, send.app, send.audience),
                )
            else:
                c.executemany(
                    "INSERT INTO send_recipients VALUES (?, ?, ?)",
                    [(send.id, i, u) for i, u in enumerate(recipients)],
                )
            return stored, True

        return await self._write(job)

    async def get_send(self, app: str, id: str) -> Send | None:
        row = await self._read(
            lambda c: c.execute(
                f"SELECT {_SEND_COLUMNS} FROM sends WHERE app = ? AND id = ?", (app, id)
            ).fetchone()
        )
        return None if row is None else _send(row)

    async def send_failures(self, app: str, id: str, limit: int) -> list[Failure]:
        rows = await self._read(
            lambda c: c.execute(
                "SELECT f.user_id, f.code, f.message FROM send_failures f JOIN sends s"
                " ON s.id = f.send_id WHERE s.app = ? AND s.id = ? ORDER BY f.user_id LIMIT ?",
                (app, id, limit),
            ).fetchall()
        )
        return [Failure(*r) for r in rows]

    async def unfinished_sends(
        self, limit: int, shards: Collection[int] | None = None
    ) -> list[Send]:
        assert shards is None, "SQLite has one process: it runs every send"
        rows = await self._read(
            lambda c: c.execute(
                f"SELECT {_SEND_COLUMNS} FROM sends WHERE finished IS NULL"
                " ORDER BY created LIMIT ?",
                (limit,),
            ).fetchall()
        )
        return [_send(r) for r in rows]

    async def send_recipients(self, id: str, offset: int, limit: int) -> list[str]:
        rows = await self._read(
            lambda c: c.execute(
                "SELECT user_id FROM send_recipients WHERE send_id = ? AND seq >= ?"
                " ORDER BY seq LIMIT ?",
                (id, offset, limit),
            ).fetchall()
        )
        return [r[0] for r in rows]

    async def send_progress(
        self, id: str, done: int, failures: Sequence[Failure], status: str, now: datetime
    ) -> None:
        at = to_micros(now)
        final = status in ("succeeded", "failed")

        def job(c: Connection) -> None:
            before = c.total_changes
            c.executemany(
                "INSERT INTO send_failures VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                [(id, f.user_id, f.code, f.message) for f in failures],
            )
            c.execute(
                "UPDATE sends SET done = max(done, ?), failed = failed + ?, status = ?,"
                " last_action = ?, finished = ? WHERE id = ?",
                (done, c.total_changes - before, status, at, at if final else None, id),
            )

        await self._write(job)


def _members(c: Connection, app: str, id: str) -> int:
    """The audience's member count; `NotFound` if there is no such audience."""
    if not c.execute("SELECT 1 FROM audiences WHERE app = ? AND id = ?", (app, id)).fetchone():
        raise NotFound(f"The audience '{id}' was not found.")
    (count,) = c.execute(
        "SELECT count(*) FROM audience_members WHERE app = ? AND audience = ?", (app, id)
    ).fetchone()
    return int(count)


def _audience(r: Any) -> Audience:
    return Audience(r[0], r[1], r[2], from_micros(r[3]), r[4])


def _send_values(s: Send) -> tuple[object, ...]:
    return (
        s.id,
        s.app,
        s.idempotency_key,
        s.fingerprint,
        s.audience,
        s.content,
        s.total,
        s.done,
        s.failed,
        s.status,
        to_micros(s.created),
        to_micros(s.last_action),
        None if s.finished is None else to_micros(s.finished),
    )


def _send(r: Any) -> Send:
    finished = None if r[12] is None else from_micros(r[12])
    return Send(
        r[0],
        r[1],
        r[2],
        r[3],
        r[4],
        bytes(r[5]),
        r[6],
        r[7],
        r[8],
        r[9],
        from_micros(r[10]),
        from_micros(r[11]),
        finished,
    )
