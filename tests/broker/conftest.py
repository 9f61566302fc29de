"""Broker backends for the contract suite: every test taking `cluster` or `broker` runs on each.

A backend is a `Cluster`: brokers on several nodes that reach each other through the backend.
A networked broker (Redis, issue 14) adds a fixture here that opens one started broker per
`node()` call on a shared server, and its name to `cluster`'s params; the tests do not change.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest

from herald.broker import Broker, MemoryBroker


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


@pytest.fixture(params=["memory"])
def cluster(request: pytest.FixtureRequest) -> Cluster:
    value: Cluster = request.getfixturevalue(request.param)
    return value


@pytest.fixture
async def broker(cluster: Cluster) -> Broker:
    return await cluster.node()
