"""The SQLite store's connections: how they are opened (URL, pragmas), how sqlite3's errors are
translated, and the migrations applied at open.

URLs follow SQLAlchemy: `sqlite:///relative.db`, `sqlite:////abs/path/herald.db` (so
f"sqlite:///{path}" is right for both), and `sqlite://:memory:` for a private in-memory database.
"""

from __future__ import annotations

import contextlib
import sqlite3
import uuid
from collections.abc import Iterator

from herald.errors import Conflict, HeraldError, Unavailable
from herald.store.schema import check_version, migrations


class Connection(sqlite3.Connection):
    """The store's connection. `outboxed` counts the outbox rows written by the open transaction,
    so that the writer knows whether its commit is one to signal (see `on_commit`); `touched`
    says that it ran the writer's no-op probe (a write `total_changes` does not count)."""

    outboxed = 0
    touched = False


# Result codes that concern the database, not one call: the whole batch fails (rolled back).
BATCH_FAILURES = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_NOMEM,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_INTERRUPT,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_CORRUPT,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_PROTOCOL,
        sqlite3.SQLITE_NOTADB,
    }
)
LOCKED = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})


@contextlib.contextmanager
def translated() -> Iterator[None]:
    """Let only `herald.errors` escape: the one place sqlite3 exceptions are mapped."""
    try:
        yield
    except HeraldError:
        raise
    except sqlite3.IntegrityError as e:
        raise Conflict(f"conflicting record: {e}") from e
    except (sqlite3.OperationalError, sqlite3.DatabaseError, sqlite3.InterfaceError) as e:
        raise Unavailable(f"database unavailable: {e}", retry_after=1) from e


def result_code(e: BaseException) -> int:
    """The primary SQLite result code of an error, or of the one it was translated from."""
    cause = e if isinstance(e, sqlite3.Error) else e.__cause__
    code = getattr(cause, "sqlite_errorcode", None)
    return -1 if code is None else int(code) & 0xFF


def failure_reason(e: BaseException) -> str:
    code = result_code(e)
    return "full" if code == sqlite3.SQLITE_FULL else "locked" if code in LOCKED else "io"


def raise_if_batch_failure(conn: Connection, e: Exception) -> None:
    """A failure of the database's, not of this call's (a full disk), or one after which SQLite
    rolled the transaction back by itself, ends the batch: nothing after it may run outside the
    transaction."""
    if not conn.in_transaction or result_code(e) in BATCH_FAILURES:
        raise e


def parse_url(url: str) -> tuple[str, bool]:
    """(database argument for sqlite3.connect, is a URI)."""
    rest = url.removeprefix("sqlite:")
    if rest in ("//:memory:", "///:memory:"):
        # memdb shares one in-memory database between this store's connections by name and,
        # unlike shared-cache mode, uses ordinary locking so busy_timeout applies.
        return f"file:/herald-{uuid.uuid4().hex}?vfs=memdb", True
    if not rest.startswith("///") or len(rest) == 3:
        raise ValueError(f"bad SQLite URL {url!r}: use sqlite:///path or sqlite://:memory:")
    return rest[3:], False


def synchronous(query: str) -> str:
    """`?synchronous=full` makes every commit fsync the WAL: acknowledged writes then survive
    power loss too, at the price of an fsync per group commit. The default, NORMAL, survives any
    crash of Herald itself but may lose the last commits if the machine loses power."""
    options = dict(p.partition("=")[::2] for p in query.split("&") if p)
    unknown = set(options) - {"synchronous"}
    if unknown:
        raise ValueError(f"unknown SQLite URL option {sorted(unknown)[0]!r}; known: synchronous")
    value = options.get("synchronous", "normal").upper()
    if value not in ("NORMAL", "FULL"):
        raise ValueError("SQLite URL option synchronous must be normal or full")
    return value


def migrate(conn: Connection) -> None:
    """Apply newer migrations in one transaction; the write lock keeps other processes out."""
    known = migrations("sqlite")
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        current = conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0]
        check_version(current, known[-1][0] if known else 0)
        for version, script in known:
            if version > current:
                for statement in statements(script):
                    conn.execute(statement)
                conn.execute("INSERT INTO schema_version VALUES (?)", (version,))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def statements(script: str) -> Iterator[str]:
    """Split a script into statements (executescript would commit our transaction)."""
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            yield buffer
            buffer = ""
    if buffer.strip() and not all(
        ln.strip().startswith("--") or not ln.strip() for ln in buffer.splitlines()
    ):
        yield buffer
