-- herald_lease: a node's lease renewal (`Shards.lease`, store/postgres/shards.py) in one call:
-- record its heartbeat, forget nodes that stopped beating, count the live ones, renew what it
-- holds, give back what it holds beyond its share or take lapsed and released shards up to it.
-- Returns the shards it holds now.
--
-- One statement, so one transaction that begins and commits on the server whatever becomes of
-- the client: a node frozen (SIGSTOP, a VM paused) in the middle of a lease transaction of
-- several statements held its `nodes` row and its shards' rows until PostgreSQL ended its
-- session (`idle_in_transaction_session_timeout`, 15 s), and every other node's renewal waited
-- on that row (deleting the stale heartbeat): a takeover took 16 s instead of the lease TTL.
--
-- Taking uses SKIP LOCKED: two nodes renewing at once skip each other's rows and never
-- deadlock. Times are the database's (now()), so nodes' clocks need not agree.
--
-- Applied with CREATE OR REPLACE after the migrations (postgres/schema.py). A change of its
-- signature needs a migration that drops the old one first (docs/storage.md).
CREATE OR REPLACE FUNCTION herald_lease(p_node text, p_ttl float8, p_shards integer)
RETURNS SETOF smallint
LANGUAGE plpgsql VOLATILE
AS $$
#variable_conflict use_column
DECLARE
    v_ttl interval := make_interval(secs => p_ttl);
    v_live bigint;
    v_share integer;
    v_held smallint[];
BEGIN
    INSERT INTO nodes (id, heartbeat) VALUES (p_node, now())
    ON CONFLICT (id) DO UPDATE SET heartbeat = excluded.heartbeat;
    DELETE FROM nodes WHERE id <> p_node AND heartbeat <= now() - v_ttl;
    SELECT count(*) + 1 INTO v_live FROM nodes WHERE id <> p_node AND heartbeat > now() - v_ttl;
    v_share := ceil(p_shards::numeric / v_live)::integer;

    -- What it still holds, expired or not: if nobody took it, it is still the node's.
    WITH renewed AS (
        UPDATE dispatch_shards SET expires = now() + v_ttl WHERE owner = p_node RETURNING shard
    )
    SELECT coalesce(array_agg(shard ORDER BY shard), '{}') INTO v_held FROM renewed;

    IF cardinality(v_held) > v_share THEN  -- another node joined: leave it its share
        UPDATE dispatch_shards SET owner = NULL, expires = '-infinity'
        WHERE owner = p_node AND shard = ANY(v_held[v_share + 1:]);
        v_held := v_held[1:v_share];
    ELSIF cardinality(v_held) < v_share THEN  -- released shards first, then lapsed ones
        WITH free AS (
            SELECT shard FROM dispatch_shards WHERE owner IS NULL OR expires <= now()
            ORDER BY owner IS NOT NULL, shard LIMIT v_share - cardinality(v_held)
            FOR UPDATE SKIP LOCKED
        ), taken AS (
            UPDATE dispatch_shards d SET owner = p_node, epoch = d.epoch + 1,
                expires = now() + v_ttl
            FROM free WHERE d.shard = free.shard RETURNING d.shard
        )
        SELECT v_held || coalesce(array_agg(shard), '{}') INTO v_held FROM taken;
    END IF;
    RETURN QUERY SELECT unnest(v_held);
END
$$;
