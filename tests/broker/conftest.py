"""Broker backends for the contract suite: every test taking `cluster` or `broker` runs on each.

A backend is a `Cluster`: brokers on several nodes that reach each other through the backend.
The memory broker's nodes are one broker; the Redis broker's are separate brokers on one private
redis-server (tests/redis.py), each with its own cursors over one change log (a real, empty
SQLite store: the contract's changes never leave a gap, so nothing is read from it but heads).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from herald.broker import Broker, MemoryBroker
from herald.broker.redis import RedisBroker
from herald.store.sqlite import SqliteStore
from tests.redis import RedisServer


@dataclass
class Cluster:
    name: str
    node: Callable[[], Awaitable[Broker]]  # one more started node; closed by the fixture


@pytest.fixture
async def memory() -> AsyncIterator[Cluster]:
    """The in-process broker is a single node: every node is the same broker."""
    broker = MemoryBroker()
    await broker.start()

    async def node() -> Broker:
        return broker

    try:
        yield Cluster("memory", node)
    finally:
        await broker.close()


@pytest.fixture
async def change_log(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    store = SqliteStore(f"sqlite:///{tmp_path / 'herald.db'}")
    await store.open()
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def redis(redis_service: RedisServer, change_log: SqliteStore) -> AsyncIterator[Cluster]:
    opened: list[RedisBroker] = []

    async def node() -> Broker:
        broker = RedisBroker(redis_service.url, change_log)
        await broker.start()
        opened.append(broker)
        return broker

    try:
        yield Cluster("redis", node)
    finally:
        for broker in opened:
            await broker.close()


@pytest.fixture(params=["memory", "redis"])
def cluster(request: pytest.FixtureRequest) -> Cluster:
    value: Cluster = request.getfixturevalue(request.param)
    return value


@pytest.fixture
async def broker(cluster: Cluster) -> Broker:
    return await cluster.node()
