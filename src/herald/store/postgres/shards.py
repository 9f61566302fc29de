"""PostgreSQL: shard leases and node heartbeats (`Shards`), in tables `dispatch_shards` and
`nodes` (migration 0006). Times are the database's (`now()`), so nodes' clocks need not agree.

A lease call is one short transaction on a pooled connection of its own, not a writer batch: a
renewal must not wait behind a queue of writes. It takes no lock it waits for but its own rows
(taking uses SKIP LOCKED), so two nodes renewing at once cannot deadlock."""

from __future__ import annotations

from herald.store.contract import SHARDS, Shards
from herald.store.postgres.connection import translated
from herald.store.postgres.writer import PostgresWriter

# $2: the caller's lease TTL (`dispatch_lease_ttl`), for the leases and the heartbeat alike: a
# node counts as live exactly as long as its leases hold.
_TTL = "make_interval(secs => $2::float8)"
# Record the heartbeat, forget nodes that stopped beating (killed), count the live ones.
_BEAT_SQL = (
    "WITH beat AS (INSERT INTO nodes (id, heartbeat) VALUES ($1, now())"
    " ON CONFLICT (id) DO UPDATE SET heartbeat = excluded.heartbeat),"
    f" gone AS (DELETE FROM nodes WHERE id <> $1 AND heartbeat <= now() - {_TTL})"
    f" SELECT count(*) + 1 FROM nodes WHERE id <> $1 AND heartbeat > now() - {_TTL}"
)
# Extend what the node still holds (expired or not: if nobody took it, it is still the node's).
_RENEW_SQL = f"UPDATE dispatch_shards SET expires = now() + {_TTL} WHERE owner = $1 RETURNING shard"
_GIVE_UP_SQL = (
    "UPDATE dispatch_shards SET owner = NULL, expires = '-infinity'"
    " WHERE owner = $1 AND shard = ANY($2::smallint[])"
)
# Released shards first, then lapsed ones; a row another node is renewing or taking is skipped.
_TAKE_SQL = (
    "WITH free AS (SELECT shard FROM dispatch_shards WHERE owner IS NULL OR expires <= now()"
    " ORDER BY owner IS NOT NULL, shard LIMIT $3 FOR UPDATE SKIP LOCKED)"
    f" UPDATE dispatch_shards d SET owner = $1, epoch = d.epoch + 1, expires = now() + {_TTL}"
    " FROM free WHERE d.shard = free.shard RETURNING d.shard"
)
_RELEASE_SQL = "UPDATE dispatch_shards SET owner = NULL, expires = '-infinity' WHERE owner = $1"
_FORGET_SQL = "DELETE FROM nodes WHERE id = $1"


class PostgresShards(PostgresWriter, Shards):
    async def lease(self, node: str, ttl: float) -> frozenset[int]:
        async with translated(), self._acquire() as conn, conn.transaction():
            live = await conn.fetchval(_BEAT_SQL, node, ttl)
            held = sorted(r[0] for r in await conn.fetch(_RENEW_SQL, node, ttl))
            share = -(-SHARDS // live)
            if len(held) > share:  # another node joined: leave it its share
                await conn.execute(_GIVE_UP_SQL, node, held[share:])
                held = held[:share]
            elif len(held) < share:
                held += [r[0] for r in await conn.fetch(_TAKE_SQL, node, ttl, share - len(held))]
        return frozenset(held)

    async def release(self, node: str) -> None:
        async with translated(), self._acquire() as conn, conn.transaction():
            await conn.execute(_RELEASE_SQL, node)
            await conn.execute(_FORGET_SQL, node)
