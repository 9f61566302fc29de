-- Herald schema 7 (PostgreSQL): the outbox sharded by user, with shard leases and node
-- heartbeats, so that several nodes share dispatch without a leader (store/contract.py `Shards`).

-- The shard of an entry's user: computed here, from a stable hash of the user id, so every node
-- agrees (hashtextextended is what hash partitioning uses, so it stays the same across releases
-- and machines). 64 shards: herald.store.contract.SHARDS.
ALTER TABLE outbox ADD COLUMN shard smallint
    GENERATED ALWAYS AS ((hashtextextended(user_id, 0) & 63)::smallint) STORED;
CREATE INDEX outbox_shard ON outbox (shard, seq);

-- Each live node's last renewal (the database's clock). A node is live while its heartbeat is
-- younger than the lease time; a live node takes its fair share, ceil(64 / live nodes).
CREATE TABLE nodes (
    id text PRIMARY KEY,
    heartbeat timestamptz NOT NULL
);

-- One row per shard, for good: its owner (NULL: none) and until when. An owner renews before
-- expires; a lapsed lease (expires <= now) or a released one (owner NULL) is anybody's to take.
-- epoch counts the changes of owner.
CREATE TABLE dispatch_shards (
    shard smallint PRIMARY KEY,
    owner text,
    epoch bigint NOT NULL DEFAULT 0,
    expires timestamptz NOT NULL DEFAULT '-infinity'
);
INSERT INTO dispatch_shards (shard) SELECT generate_series(0, 63);
