"""SQLite: one process, so one node, which holds every shard (`Shards`); nothing is stored."""

from __future__ import annotations

from herald.store.contract import SHARDS, Shards
from herald.store.sqlite.database import SqliteDatabase

_EVERY = frozenset(range(SHARDS))


class SqliteShards(SqliteDatabase, Shards):
    async def lease(self, node: str, ttl: float) -> frozenset[int]:
        return _EVERY

    async def release(self, node: str) -> None:
        return None
