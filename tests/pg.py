"""PostgreSQL for server-level tests: a fresh schema per use, on HERALD_TEST_POSTGRES_URL."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator

import pytest


def postgres_url() -> str:
    url = os.environ.get("HERALD_TEST_POSTGRES_URL")
    if not url:
        message = "HERALD_TEST_POSTGRES_URL is not set (run scripts/postgres to get one)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return url


async def _admin(url: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def fresh_database() -> Iterator[str]:
    """Yield a store URL whose search_path is a new, empty schema; drop it afterwards.

    asyncpg passes unknown URL query parameters to the server as settings."""
    url = postgres_url()
    schema = f"test_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(url, f"CREATE SCHEMA {schema}"))
    try:
        yield f"{url}{'&' if '?' in url else '?'}search_path={schema}"
    finally:
        asyncio.run(_admin(url, f"DROP SCHEMA {schema} CASCADE"))
