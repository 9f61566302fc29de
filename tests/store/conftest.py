"""Store backends for the contract suite: every test taking `store` or `backend` runs on each."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from herald.store import Store
from herald.store.sqlite import SqliteStore
from tests.pg import postgres_url


@dataclass
class Backend:
    """Opens stores on one database; several may be open at once (reopen, two nodes)."""

    name: str
    make: Callable[[], Store]
    dsn: str | None = None  # PostgreSQL: a URL for a raw connection to the same schema


@pytest.fixture
def sqlite_file(tmp_path: Path) -> Iterator[Backend]:
    url = f"sqlite:///{tmp_path / 'herald.db'}"
    yield Backend("sqlite_file", lambda: SqliteStore(url))


@pytest.fixture
def sqlite_memory() -> Iterator[Backend]:
    yield Backend("sqlite_memory", lambda: SqliteStore("sqlite://:memory:"))


@pytest.fixture
async def postgres() -> AsyncIterator[Backend]:
    url = postgres_url()
    import asyncpg

    from herald.store.postgres import PostgresStore

    schema = f"test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(url)
    try:
        await admin.execute(f"CREATE SCHEMA {schema}")
        yield Backend(
            "postgres",
            lambda: PostgresStore(url, min_size=1, server_settings={"search_path": schema}),
            f"{url}{'&' if '?' in url else '?'}search_path={schema}",
        )
    finally:
        await admin.execute(f"DROP SCHEMA {schema} CASCADE")
        await admin.close()


@pytest.fixture(
    params=["sqlite_file", "sqlite_memory", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def backend(request: pytest.FixtureRequest) -> Backend:
    value: Backend = request.getfixturevalue(request.param)
    return value


@pytest.fixture(params=["sqlite_file", pytest.param("postgres", marks=pytest.mark.postgres)])
def durable_backend(request: pytest.FixtureRequest) -> Backend:
    """Backends whose database outlives a store (an in-memory one belongs to its store)."""
    value: Backend = request.getfixturevalue(request.param)
    return value


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[Store]:
    s = backend.make()
    await s.open()
    try:
        yield s
    finally:
        await s.close()
