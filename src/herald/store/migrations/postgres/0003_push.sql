-- Herald schema 3 (PostgreSQL): push delivery.

-- How pushes to the subscription's channel have gone (Subscription.delivery), and the newest
-- change position the device is known to have fetched (Subscription.seen_position).
ALTER TABLE subscriptions
    ADD COLUMN last_delivered timestamptz,
    ADD COLUMN consecutive_failures integer NOT NULL DEFAULT 0,
    ADD COLUMN last_error text,
    ADD COLUMN gone timestamptz,  -- set: the push service said the channel is gone
    ADD COLUMN seen_position bigint NOT NULL DEFAULT 0;

-- Queued pushes, one per (change, subscription), inserted in the transaction that removes the
-- change's outbox row (only if that transaction removed it: two nodes draining the outbox never
-- queue one change twice) and deleted once settled. `due` is when it may be claimed next (a claim
-- moves it to the end of its lease; claims lock with SKIP LOCKED, so nodes never take the same
-- row). No foreign key to subscriptions: a subscription deleted after fan-out must not fail the
-- dispatch; its deliveries are deleted with it, and `claim` purges any left over.
CREATE TABLE deliveries (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    subscription_id text COLLATE "C" NOT NULL,
    user_id text COLLATE "C" NOT NULL,
    app text COLLATE "C" NOT NULL,
    provider text NOT NULL,
    message text NOT NULL,         -- msgspec JSON of model.Message
    notification_id text COLLATE "C" NOT NULL,  -- the message's notification and change
    position bigint NOT NULL,                   -- position: a later change supersedes it
    expires timestamptz NOT NULL,  -- the message's `expires`: claim purges it from then on
    due timestamptz NOT NULL,
    attempts integer NOT NULL DEFAULT 0,  -- claims so far: a settle applies to the latest only
    created timestamptz NOT NULL
);
CREATE INDEX deliveries_due ON deliveries (provider, due, id);
-- By subscription (deleting a subscription's deliveries), and by subscription and notification:
-- superseding, which finds a user's queued deliveries of a notification through the user's
-- subscriptions (a delivery's subscription is always its user's; one whose subscription was
-- deleted is never sent, `claim` purges it). No index of its own: every claim moves `due`, so
-- each index on this table is written per claim.
CREATE INDEX deliveries_subscription ON deliveries (subscription_id, notification_id);

-- Push credentials per app (host name) and kind ("vapid", "apns", "fcm", "wns"): opaque bytes.
CREATE TABLE push_credentials (
    app text COLLATE "C" NOT NULL,
    kind text NOT NULL,
    secret bytea NOT NULL,
    updated timestamptz NOT NULL,
    PRIMARY KEY (app, kind)
);

-- herald_put_batch as in schema 2, except that a put replacing a live notification logs the
-- kind 'replaced' (read back as an UPDATED change with `replaced` set) instead of 'updated'.
-- An expired row a put takes over is still EXPIRED then CREATED. Same signature: replaced in
-- place.
CREATE OR REPLACE FUNCTION herald_put_batch(
    p_user text[],
    p_app text[],
    p_anid text[],
    p_new_id text[],
    p_host text[],
    p_group text[],
    p_priority text[],
    p_at timestamptz[],
    p_expires timestamptz[],
    p_content bytea[],
    p_origin text[]
) RETURNS TABLE (o_ord bigint, o_id text, o_version integer, o_created_at timestamptz,
                 o_created boolean)
LANGUAGE plpgsql VOLATILE
-- Every join here goes from the call's rows to one row each by an index, whatever the sizes: plan
-- once per connection (generic plans, no planning per call), and never a hash join over a scan of
-- a whole table because estimates (statistics, array sizes) are off.
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
SET enable_hashjoin = off
SET enable_mergejoin = off
AS $$
#variable_conflict use_column
BEGIN
    IF EXISTS (SELECT FROM unnest(p_user, p_app, p_anid, p_new_id) AS t(u, a, anid, nid)
               GROUP BY u, a, coalesce(anid, nid) HAVING count(*) > 1) THEN
        RAISE EXCEPTION 'herald_put_batch: two puts of one call have the same key';
    END IF;

    INSERT INTO feed_heads AS h (user_id, position)
    SELECT u, count(*) FROM unnest(p_user) AS t(u) GROUP BY u ORDER BY u COLLATE "C"
    ON CONFLICT (user_id) DO UPDATE SET position = h.position + excluded.position;

    -- A new statement, so a new snapshot: it sees every write committed before the locks above.
    RETURN QUERY
    WITH cur AS (
        -- Each put with the live-or-expired row it replaces (if any).
        SELECT t.*, coalesce(t.anid, t.nid) AS key, n.id AS old_id,
            n.expiration_date_time <= t.at AS expired
        FROM unnest(p_user, p_app, p_anid, p_new_id, p_host, p_group, p_priority, p_at,
                    p_expires, p_content, p_origin)
             WITH ORDINALITY AS t(u, a, anid, nid, host, grp, prio, at, exp, body, orig, i)
        LEFT JOIN notifications n
            ON t.anid IS NOT NULL
            AND ARRAY[n.user_id, n.app, n.app_notification_id] = ARRAY[t.u, t.a, t.anid]
    ), upd AS (
        -- Replace the content; an expired row becomes the new notification (new id).
        UPDATE notifications n SET
            id = CASE WHEN cur.expired THEN cur.nid ELSE n.id END,
            target_host_name = cur.host,
            group_name = cur.grp,
            priority = cur.prio,
            read_state = 'unread',
            user_action_state = 'none',
            created_date_time = CASE WHEN cur.expired THEN cur.at ELSE n.created_date_time END,
            last_modified_date_time = cur.at,
            expiration_date_time = cur.exp,
            version = CASE WHEN cur.expired THEN 1 ELSE n.version + 1 END,
            content = cur.body
        FROM cur
        WHERE cur.old_id IS NOT NULL AND n.id = cur.old_id
        RETURNING cur.i, cur.u, cur.a, cur.at, n.id, n.version, n.created_date_time, cur.expired,
            cur.old_id, cur.orig
    ), ins AS (
        -- A plain INSERT: a colliding id or key fails the call instead of overwriting a row.
        INSERT INTO notifications (id, user_id, app, app_notification_id, target_host_name,
            group_name, priority, read_state, user_action_state, created_date_time,
            last_modified_date_time, expiration_date_time, version, content)
        SELECT cur.nid, cur.u, cur.a, cur.key, cur.host, cur.grp, cur.prio, 'unread', 'none',
            cur.at, cur.at, cur.exp, 1, cur.body
        FROM cur WHERE cur.old_id IS NULL
    ), written AS (
        SELECT upd.i, upd.u, upd.a, upd.at, upd.id, upd.version, upd.created_date_time,
            upd.expired AS created, upd.orig
        FROM upd
        UNION ALL
        SELECT cur.i, cur.u, cur.a, cur.at, cur.nid, 1, cur.at, true, cur.orig
        FROM cur WHERE cur.old_id IS NULL
    ), logged AS (
        SELECT upd.u, upd.i, 0 AS sub, 'expired' AS kind, upd.a, upd.old_id AS nid, upd.at,
            NULL::text AS orig
        FROM upd WHERE upd.expired
        UNION ALL
        SELECT w.u, w.i, 1, CASE WHEN w.created THEN 'created' ELSE 'replaced' END, w.a, w.id,
            w.at, w.orig
        FROM written w
    ), appended AS (
        -- The head was moved past this call's puts: they take the positions just below it, in
        -- input order.
        INSERT INTO changes (user_id, position, kind, app, notification_id, at, origin)
        SELECT l.u, h.position - count(*) FILTER (WHERE l.sub = 1) OVER w + row_number() OVER w,
            l.kind, l.a, l.nid, l.at, l.orig
        FROM logged l JOIN feed_heads h ON h.user_id = l.u
        WINDOW w AS (PARTITION BY l.u ORDER BY l.i, l.sub
                     ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING)
        RETURNING user_id, position
    ), outboxed AS (
        -- One outbox row per change. The sort runs below the insert, so seqs are drawn in
        -- position order; and after the head locks, so a user's later calls draw larger seqs.
        INSERT INTO outbox (user_id, position)
        SELECT a.user_id, a.position FROM appended a ORDER BY a.user_id, a.position
    ), moved AS (
        -- EXPIRED changes were not reserved: move those heads further.
        UPDATE feed_heads h SET position = h.position + x.n
        FROM (SELECT upd.u, count(*) AS n FROM upd WHERE upd.expired GROUP BY upd.u) AS x
        WHERE h.user_id = x.u
    )
    SELECT w.i, w.id, w.version, w.created_date_time, w.created FROM written w;
END
$$;
