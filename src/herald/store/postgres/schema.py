"""The PostgreSQL schema at open: the numbered migrations (schema changes only), then the
server-side functions, each kept whole in a file of its own (functions/) and applied after the
migrations, so that a function always meets the newest schema and no migration restates one.

Both steps run in one transaction under an advisory lock: several nodes may start at once, and
one migrates while the others wait and then find it done. A function is created or replaced
(CREATE OR REPLACE) unless the database already has the file's very text: its comment holds the
file's digest, so an up-to-date database sees no DDL at open. docs/storage.md has the rules for
changing a function.
"""

from __future__ import annotations

import hashlib
from importlib import resources

import asyncpg

from herald.errors import HeraldError
from herald.store.schema import check_version, migrations

# A long timeout: another node may be migrating a large table.
MIGRATION_TIMEOUT = 3600.0


def functions() -> list[tuple[str, str]]:
    """(name, sql) of every packaged function, by name (the file is named after the function)."""
    folder = resources.files("herald.store.postgres").joinpath("functions")
    found = [
        (entry.name.removesuffix(".sql"), entry.read_text("utf-8"))
        for entry in folder.iterdir()
        if entry.name.endswith(".sql")
    ]
    return sorted(found)


def digest(sql: str) -> str:
    """What a function's comment says once the function is `sql`."""
    return f"herald sha256:{hashlib.sha256(sql.encode()).hexdigest()}"


async def migrate(conn: asyncpg.Connection) -> None:
    """Apply the newer migrations, then the functions, in one transaction."""
    known = migrations("postgres")
    async with conn.transaction():
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext('herald-migrate'))", timeout=MIGRATION_TIMEOUT
        )
        await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)")
        current = await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_version")
        check_version(current, known[-1][0] if known else 0)
        for version, script in known:
            if version > current:
                await conn.execute(script, timeout=MIGRATION_TIMEOUT)
                await conn.execute("INSERT INTO schema_version VALUES ($1)", version)
        for name, sql in functions():
            await _apply(conn, name, sql)


# The functions of this name in the schema new objects go to (the first of the search path), with
# their comments and the statement that comments one.
_FOUND_SQL = (
    "SELECT obj_description(p.oid, 'pg_proc'), format('COMMENT ON FUNCTION %s IS %L',"
    " p.oid::regprocedure, $2::text) FROM pg_proc p"
    " WHERE p.proname = $1 AND p.pronamespace ="
    " (SELECT oid FROM pg_namespace WHERE nspname = current_schema())"
)


async def _apply(conn: asyncpg.Connection, name: str, sql: str) -> None:
    """Create or replace the function `name` as `sql` has it, unless it is so already."""
    mark = digest(sql)
    found = await conn.fetch(_FOUND_SQL, name, mark)
    if len(found) == 1 and found[0][0] == mark:
        return
    await conn.execute(sql, timeout=MIGRATION_TIMEOUT)
    found = await conn.fetch(_FOUND_SQL, name, mark)
    if len(found) != 1:
        # CREATE OR REPLACE with other arguments adds a function beside the old one.
        raise HeraldError(
            f"the database has {len(found)} functions {name}: a migration must drop the old"
            " signature before functions/ changes it"
        )
    await conn.execute(found[0][1])
