"""The PostgreSQL store's connections: how asyncpg's errors are translated, and what a failed
statement says about its connection and about what reached the database."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import datetime

import asyncpg

from herald.errors import Conflict, HeraldError, Unavailable

# The database is away or cannot take writes right now; a retry later may succeed (503).
TRANSIENT = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.PostgresConnectionError,  # class 08
    asyncpg.OperatorInterventionError,  # class 57: shutdown, terminated, cancelled, starting up
    asyncpg.InsufficientResourcesError,  # class 53: disk full, out of memory, too many clients
    asyncpg.ReadOnlySQLTransactionError,  # connected to a standby (after a failover)
    asyncpg.DeadlockDetectedError,
)
# Everything the driver raises (DataError, a value it cannot encode, is an InterfaceError).
DRIVER = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)


def translate(e: BaseException) -> HeraldError:
    """The one place asyncpg exceptions are mapped to `herald.errors`."""
    if isinstance(e, HeraldError):
        return e
    if isinstance(e, asyncpg.UniqueViolationError):
        return Conflict(f"conflicting record: {e}")
    if isinstance(e, TRANSIENT) and not isinstance(e, asyncpg.DataError):
        return Unavailable(f"database unavailable: {describe(e)}", retry_after=1)
    return HeraldError(f"database error: {e}")


@contextlib.asynccontextmanager
async def translated() -> AsyncIterator[None]:
    """Let only `herald.errors` escape (of the driver's errors)."""
    try:
        yield
    except DRIVER as e:
        raise translate(e) from e


def describe(e: BaseException) -> str:
    return str(e) or type(e).__name__


def attached(conn: asyncpg.Connection) -> bool:
    """Whether a pooled connection is still the caller's: when asyncpg sees a connection close,
    it takes it back into the pool itself, and every call on the caller's proxy then raises.
    (Not always: a connection can also be closed and still attached, until released.)"""
    try:
        conn.is_closed()
    except asyncpg.InterfaceError:  # "released back to the pool"
        return False
    return True


def usable(conn: asyncpg.Connection) -> bool:
    """Whether a pooled connection can still be used."""
    return attached(conn) and not conn.is_closed()


def refused(e: BaseException) -> bool:
    """Whether the server (or the driver, before sending) refused a statement, leaving the
    connection fine and the transaction rolled back: then no call of the batch was applied."""
    if isinstance(e, asyncpg.PostgresError):
        return not isinstance(e, asyncpg.PostgresConnectionError) and (
            not isinstance(e, asyncpg.OperatorInterventionError)
            or isinstance(e, asyncpg.QueryCanceledError)
        )
    return isinstance(e, asyncpg.DataError)


def unsent(e: BaseException, conn: asyncpg.Connection) -> bool:
    """Whether `e` was raised before the statement left this process, because the connection
    had already closed: then nothing of the batch reached the database, and it may be sent again
    on a new connection. (A connection the server closed while idle is only noticed here when
    its closing is still unread on the socket.)"""
    if isinstance(e, asyncpg.InternalClientError):  # the protocol refused to start the statement
        return str(e).startswith(("cannot switch to state", "not connected"))
    return isinstance(e, asyncpg.InterfaceError) and not usable(conn)


def identity(value: datetime) -> datetime:
    """asyncpg returns aware datetimes: rows map them as they are."""
    return value
