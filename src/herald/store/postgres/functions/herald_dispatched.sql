-- herald_dispatched: `Outbox.dispatched` in one call, so the dispatcher's removal of a batch is
-- one round trip and, called outside an explicit transaction, one transaction (it was BEGIN, a
-- statement or three, COMMIT). Arguments: the outbox seqs to remove; the deliveries to queue as
-- parallel arrays (p_sub ... p_due, one element per delivery) with their `created` time; the
-- pushes to hold for quiet hours as parallel arrays (p_h_sub ... p_h_release). Only the
-- deliveries and held pushes of entries this call removed are written: an entry another node
-- removed first has had its pushes queued by that node. Returns how many entries it removed.
--
-- That filter is `cardinality(r_user) = 0 OR (u, p) IN (...)`: never true on the left (r_user
-- has a row by then), but an IN under an OR stays a hashed subplan, one hash lookup per row,
-- where a plain IN becomes a semi-join, nested loop here (512 entries x 1,000 deliveries: 27 ms
-- against 1.4 ms).
--
-- The first statement removes the entries and answers which ones it removed: another node
-- removing one of them at the same time makes it wait for that node's commit, then skip the
-- entry. The statements after it take a new snapshot (a VOLATILE function in READ COMMITTED),
-- taken after that commit, so they see the deliveries the other node queued: for the removed
-- entries that change a notification (not CREATED), delete the queued deliveries of that
-- notification with an older position (superseded), then queue the new ones.
--
-- Superseding finds a user's queued deliveries of a notification by index probes of
-- (subscription_id, notification_id) for the user's subscriptions (deliveries_subscription in
-- 0003_push.sql), per entry (OFFSET 0), never a scan of the queue; the rows are locked in id
-- order, as `settle` locks them.
--
-- Applied with CREATE OR REPLACE after the migrations (postgres/schema.py). A change of its
-- signature needs a migration that drops the old one first (docs/storage.md).
CREATE OR REPLACE FUNCTION herald_dispatched(
    p_seqs bigint[],
    p_sub text[],
    p_user text[],
    p_app text[],
    p_provider text[],
    p_message text[],
    p_nid text[],
    p_position bigint[],
    p_expires timestamptz[],
    p_due timestamptz[],
    p_created timestamptz,
    p_h_sub text[],
    p_h_user text[],
    p_h_app text[],
    p_h_provider text[],
    p_h_nid text[],
    p_h_position bigint[],
    p_h_expires timestamptz[],
    p_h_release timestamptz[]
) RETURNS integer
LANGUAGE plpgsql VOLATILE
-- As herald_put_batch: plan once per connection, index probes whatever the estimates say.
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
SET enable_hashjoin = off
SET enable_mergejoin = off
AS $$
DECLARE
    r_user text[];
    r_position bigint[];
    r_nid text[];  -- per removed entry: its notification if the change supersedes, else NULL
BEGIN
    WITH removed AS (
        DELETE FROM outbox o WHERE o.seq = ANY(p_seqs)
        RETURNING o.user_id, o.position,
            (SELECT c.notification_id FROM changes c WHERE c.user_id = o.user_id
             AND c.position = o.position AND c.kind <> 'created') AS nid
    )
    SELECT array_agg(user_id), array_agg(position), array_agg(nid)
    INTO r_user, r_position, r_nid FROM removed;
    IF r_user IS NULL THEN
        RETURN 0;  -- all removed already (by another node): nothing may be queued
    END IF;

    IF EXISTS (SELECT FROM unnest(r_nid) AS x(n) WHERE n IS NOT NULL) THEN
        WITH found AS (
            SELECT f.id FROM unnest(r_user, r_nid, r_position) AS o(u, n, p)
            CROSS JOIN LATERAL (
                SELECT d.id FROM deliveries d
                WHERE d.subscription_id = ANY(ARRAY(
                        SELECT s.id FROM subscriptions s WHERE s.user_id = o.u))
                    AND d.notification_id = o.n AND d.position < o.p AND d.user_id = o.u
                OFFSET 0) AS f
            WHERE o.n IS NOT NULL
        ), doomed AS (
            SELECT d.id FROM deliveries d WHERE d.id = ANY(ARRAY(SELECT id FROM found))
            ORDER BY d.id FOR UPDATE
        )
        DELETE FROM deliveries WHERE id = ANY(ARRAY(SELECT id FROM doomed));
    END IF;

    -- Most batches queue nothing (no push channels): no statement then.
    IF cardinality(p_sub) > 0 THEN
    INSERT INTO deliveries (subscription_id, user_id, app, provider, message, notification_id,
        position, expires, due, created)
    SELECT t.*, p_created
    FROM unnest(p_sub, p_user, p_app, p_provider, p_message, p_nid, p_position, p_expires,
                p_due) AS t(sub, u, a, prov, msg, n, p, exp, due)
    WHERE cardinality(r_user) = 0 OR (t.u, t.p) IN (SELECT * FROM unnest(r_user, r_position));
    END IF;

    IF cardinality(p_h_sub) > 0 THEN
    INSERT INTO held_pushes (subscription_id, user_id, app, provider, notification_id, position,
        expires, release_at)
    SELECT t.*
    FROM unnest(p_h_sub, p_h_user, p_h_app, p_h_provider, p_h_nid, p_h_position, p_h_expires,
                p_h_release) AS t(sub, u, a, prov, n, p, exp, rel)
    WHERE cardinality(r_user) = 0 OR (t.u, t.p) IN (SELECT * FROM unnest(r_user, r_position));
    END IF;

    RETURN cardinality(r_user);
END
$$;
