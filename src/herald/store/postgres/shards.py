"""PostgreSQL: shard leases and node heartbeats (`Shards`), in tables `dispatch_shards` and
`nodes` (migration 0006). Times are the database's (`now()`), so nodes' clocks need not agree.

A lease call is one statement, the function `herald_lease` (functions/herald_lease.sql), on a
connection kept for the leases (`LEASES`), not a writer batch nor a pooled connection: a renewal
must not wait behind a queue of writes or for a connection the reads have all taken (either
would let the leases lapse), nor leave a transaction open if the node stops in the middle of it."""

from __future__ import annotations

from herald.store.contract import SHARDS, Shards
from herald.store.postgres.writer import LEASES, PostgresWriter

# One statement, so one transaction wherever the client stops (functions/herald_lease.sql says
# why); $2 is the caller's lease TTL (`dispatch_lease_ttl`), for the leases and the heartbeat
# alike: a node counts as live exactly as long as its leases hold.
_LEASE_SQL = "SELECT herald_lease($1, $2::float8, $3)"
# Give back every shard and forget the node: one statement too.
_RELEASE_SQL = (
    "WITH released AS (UPDATE dispatch_shards SET owner = NULL, expires = '-infinity'"
    " WHERE owner = $1) DELETE FROM nodes WHERE id = $1"
)


class PostgresShards(PostgresWriter, Shards):
    async def lease(self, node: str, ttl: float) -> frozenset[int]:
        rows = await self._kept(LEASES, lambda conn: conn.fetch(_LEASE_SQL, node, ttl, SHARDS))
        return frozenset(int(r[0]) for r in rows)

    async def release(self, node: str) -> None:
        await self._kept(LEASES, lambda conn: conn.execute(_RELEASE_SQL, node))
