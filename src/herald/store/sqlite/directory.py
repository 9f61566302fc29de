"""SQLite: apps, their client ids, and user principal names (`Directory`)."""

from __future__ import annotations

import sqlite3
from datetime import datetime

from herald.errors import Conflict, NotFound
from herald.model import App
from herald.store.contract import Directory
from herald.store.rows import APP_ORDER, APP_SELECT, app_from_row, from_micros, to_micros
from herald.store.schema import DELETE_APP, LAST_CLIENT
from herald.store.sqlite.connection import Connection
from herald.store.sqlite.database import SqliteDatabase


class SqliteDirectory(SqliteDatabase, Directory):
    async def add_app(self, app: App) -> None:
        def job(c: Connection) -> None:
            try:
                c.execute(
                    "INSERT INTO apps VALUES (?, ?, ?)",
                    (app.host_name, app.display_name, to_micros(app.created_date_time)),
                )
                _insert_client(c, app)
            except sqlite3.IntegrityError as e:
                raise Conflict("an app with this client id or host name exists") from e

        await self._write(job)

    async def add_client(self, app: App) -> None:
        def job(c: Connection) -> None:
            if c.execute("SELECT 1 FROM apps WHERE host_name = ?", (app.host_name,)).fetchone():
                try:
                    _insert_client(c, app)
                except sqlite3.IntegrityError as e:
                    raise Conflict(f"the client id {app.client_id!r} is taken") from e
            else:
                raise NotFound(f"no app with host name {app.host_name!r}")

        await self._write(job)

    async def remove_client(self, client_id: str) -> None:
        def job(c: Connection) -> None:
            row = c.execute(
                "SELECT (SELECT count(*) FROM app_clients AS o WHERE o.host_name = a.host_name)"
                " FROM app_clients AS a WHERE a.client_id = ?",
                (client_id,),
            ).fetchone()
            if row is None:
                raise NotFound(f"no client id {client_id!r}")
            if row[0] < 2:
                raise Conflict(LAST_CLIENT)
            c.execute("DELETE FROM app_clients WHERE client_id = ?", (client_id,))

        await self._write(job)

    async def set_client_secret(self, client_id: str, secret_hash: str) -> None:
        def job(c: Connection) -> None:
            done = c.execute(
                "UPDATE app_clients SET secret_hash = ? WHERE client_id = ?",
                (secret_hash, client_id),
            )
            if done.rowcount == 0:
                raise NotFound(f"no client id {client_id!r}")

        await self._write(job)

    async def get_app(self, client_id: str) -> App | None:
        rows = await self._read(
            lambda c: c.execute(f"{APP_SELECT} WHERE c.client_id = ?", (client_id,)).fetchall()
        )
        return app_from_row(rows[0], from_micros) if rows else None

    async def list_apps(self) -> list[App]:
        rows = await self._read(lambda c: c.execute(APP_SELECT + APP_ORDER).fetchall())
        return [app_from_row(r, from_micros) for r in rows]

    async def delete_app(self, host_name: str) -> dict[str, int] | None:
        return await self._write(lambda c: _delete_app(c, host_name))

    async def user_of(self, upn: str) -> str | None:
        row = await self._read(
            lambda c: c.execute("SELECT user_id FROM user_names WHERE upn = ?", (upn,)).fetchone()
        )
        return None if row is None else str(row[0])

    async def name_user(self, upn: str, user_id: str, pinned: bool, now: datetime) -> bool:
        def job(c: Connection) -> bool:
            c.execute(
                "INSERT INTO user_names VALUES (?1, ?2, ?3, ?4) ON CONFLICT (upn) DO UPDATE"
                " SET user_id = ?2, pinned = ?3, updated = ?4 WHERE ?3 OR user_id = ?2",
                (upn, user_id, int(pinned), to_micros(now)),
            )
            row = c.execute("SELECT user_id FROM user_names WHERE upn = ?", (upn,)).fetchone()
            return bool(row[0] == user_id)

        return await self._write(job)

    async def forget_user_name(self, upn: str) -> bool:
        return await self._write(
            lambda c: c.execute("DELETE FROM user_names WHERE upn = ?", (upn,)).rowcount > 0
        )

    async def list_user_names(self) -> list[tuple[str, str, bool]]:
        rows = await self._read(
            lambda c: c.execute(
                "SELECT upn, user_id, pinned FROM user_names ORDER BY upn"
            ).fetchall()
        )
        return [(r[0], r[1], bool(r[2])) for r in rows]


def _insert_client(c: Connection, app: App) -> None:
    c.execute(
        "INSERT INTO app_clients VALUES (?, ?, ?, ?, ?)",
        (
            app.client_id,
            app.host_name,
            app.platform,
            app.secret_hash,
            to_micros(app.created_date_time),
        ),
    )


def _delete_app(c: Connection, host_name: str) -> dict[str, int] | None:
    if c.execute("SELECT 1 FROM apps WHERE host_name = ?", (host_name,)).fetchone() is None:
        return None
    # A user's next position is max(log, head) + 1: raise the head past the changes removed.
    c.execute(
        "INSERT INTO feed_heads (user_id, position) SELECT user_id, max(position) FROM changes"
        " WHERE app = ? GROUP BY user_id ON CONFLICT (user_id)"
        " DO UPDATE SET position = max(position, excluded.position)",
        (host_name,),
    )
    counts = {}
    for kind, statement in DELETE_APP:
        counts[kind] = c.execute(statement.format(p="?"), (host_name,)).rowcount
    del counts["apps"]
    return counts
