"""PostgreSQL: apps, their client ids, and user principal names (`Directory`)."""

from __future__ import annotations

from datetime import datetime

import asyncpg

from herald.errors import Conflict, NotFound
from herald.model import App
from herald.store.contract import Directory
from herald.store.postgres.connection import translated
from herald.store.postgres.transaction import Tx
from herald.store.postgres.writer import PostgresWriter
from herald.store.rows import APP_ORDER, APP_SELECT, app_from_row, as_utc
from herald.store.schema import DELETE_APP, LAST_CLIENT


class PostgresDirectory(PostgresWriter, Directory):
    # Ops must fail before they write (an op's error does not roll its transaction back): each
    # checks first, and inserts with ON CONFLICT DO NOTHING.
    async def add_app(self, app: App) -> None:
        async def run(tx: Tx) -> None:
            if await _client_exists(tx.conn, app.client_id):
                raise Conflict("an app with this client id or host name exists")
            added = await tx.conn.fetchval(
                "INSERT INTO apps VALUES ($1, $2, $3) ON CONFLICT DO NOTHING RETURNING host_name",
                app.host_name,
                app.display_name,
                app.created_date_time,
            )
            if added is None:
                raise Conflict("an app with this client id or host name exists")
            await _insert_client(tx.conn, app)

        await self._op(None, run)

    async def add_client(self, app: App) -> None:
        async def run(tx: Tx) -> None:
            if not await tx.conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM apps WHERE host_name = $1)", app.host_name
            ):
                raise NotFound(f"no app with host name {app.host_name!r}")
            if await _client_exists(tx.conn, app.client_id):
                raise Conflict(f"the client id {app.client_id!r} is taken")
            await _insert_client(tx.conn, app)

        await self._op(None, run)

    async def remove_client(self, client_id: str) -> None:
        async def run(tx: Tx) -> None:
            siblings = await tx.conn.fetchval(
                "SELECT (SELECT count(*) FROM app_clients AS o WHERE o.host_name = a.host_name)"
                " FROM app_clients AS a WHERE a.client_id = $1",
                client_id,
            )
            if siblings is None:
                raise NotFound(f"no client id {client_id!r}")
            if siblings < 2:
                raise Conflict(LAST_CLIENT)
            await tx.conn.execute("DELETE FROM app_clients WHERE client_id = $1", client_id)

        await self._op(None, run)

    async def set_client_secret(self, client_id: str, secret_hash: str) -> None:
        async def run(tx: Tx) -> None:
            done = await tx.conn.fetchval(
                "UPDATE app_clients SET secret_hash = $2 WHERE client_id = $1 RETURNING 1",
                client_id,
                secret_hash,
            )
            if done is None:
                raise NotFound(f"no client id {client_id!r}")

        await self._op(None, run)

    async def get_app(self, client_id: str) -> App | None:
        async with translated(), self._acquire() as conn:
            row = await conn.fetchrow(f"{APP_SELECT} WHERE c.client_id = $1", client_id)
        return None if row is None else app_from_row(row, as_utc)

    async def list_apps(self) -> list[App]:
        async with translated(), self._acquire() as conn:
            rows = await conn.fetch(APP_SELECT + APP_ORDER)
        return [app_from_row(r, as_utc) for r in rows]

    async def delete_app(self, host_name: str) -> dict[str, int] | None:
        async def run(tx: Tx) -> dict[str, int] | None:
            if not await tx.conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM apps WHERE host_name = $1)", host_name
            ):
                return None
            # Positions come from feed_heads here, so removing changes never reuses one.
            counts = {}
            for kind, statement in DELETE_APP:
                status = await tx.conn.execute(statement.format(p="$1"), host_name)
                counts[kind] = int(status.split()[-1])
            del counts["apps"]
            return counts

        return await self._op(None, run)

    async def user_of(self, upn: str) -> str | None:
        async with translated(), self._acquire() as conn:
            found = await conn.fetchval("SELECT user_id FROM user_names WHERE upn = $1", upn)
        return None if found is None else str(found)

    async def name_user(self, upn: str, user_id: str, pinned: bool, now: datetime) -> bool:
        async def run(tx: Tx) -> bool:
            await tx.conn.execute(
                "INSERT INTO user_names VALUES ($1, $2, $3, $4) ON CONFLICT (upn) DO UPDATE"
                " SET user_id = $2, pinned = $3, updated = $4"
                " WHERE $3 OR user_names.user_id = $2",
                upn,
                user_id,
                pinned,
                now,
            )
            named = await tx.conn.fetchval("SELECT user_id FROM user_names WHERE upn = $1", upn)
            return bool(named == user_id)

        return await self._op(None, run)

    async def forget_user_name(self, upn: str) -> bool:
        async def run(tx: Tx) -> bool:
            status = await tx.conn.execute("DELETE FROM user_names WHERE upn = $1", upn)
            return bool(status != "DELETE 0")

        return await self._op(None, run)

    async def list_user_names(self) -> list[tuple[str, str, bool]]:
        async with translated(), self._acquire() as conn:
            rows = await conn.fetch("SELECT upn, user_id, pinned FROM user_names ORDER BY upn")
        return [(r[0], r[1], bool(r[2])) for r in rows]


async def _client_exists(conn: asyncpg.Connection, client_id: str) -> bool:
    found = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM app_clients WHERE client_id = $1)", client_id
    )
    return bool(found)


async def _insert_client(conn: asyncpg.Connection, app: App) -> None:
    await conn.execute(
        "INSERT INTO app_clients VALUES ($1, $2, $3, $4, $5)",
        app.client_id,
        app.host_name,
        app.platform,
        app.secret_hash,
        app.created_date_time,
    )
