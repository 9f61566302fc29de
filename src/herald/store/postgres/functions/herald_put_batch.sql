-- herald_put_batch: a batch of puts (create, or replace the live notification with the same
-- (user, app, appNotificationId)) in one call, so a batch costs one round trip and, called outside
-- an explicit transaction, is one transaction. Arguments are parallel arrays, one element per put;
-- `anid` NULL means "keyed by new_id, create" (no lookup: a clash is an error); `origin` is the
-- posting device's subscription, if it named itself. No two puts of a call may have the same key
-- (the caller splits those into successive calls); such a call fails. Returns one row per put:
-- its 1-based ordinal, the notification's id, version, created time and whether it was created;
-- then, if `p_entries` (else NULLs), what the dispatcher needs to publish the put's change
-- without reading it back (`Outbox.on_outboxed`): its position and outbox seq
-- (NULL for a put that also logged EXPIRED, which is left to the outbox read), whether its
-- (user, app) has a push target, and whether it was its user's first entry left in the outbox
-- (`o_first`: every earlier change of the user had been dispatched, so publishing it at once
-- keeps the user's order); these two from herald_entry_state.
-- A put whose row exists but has expired appends EXPIRED (old id) and then CREATED, and the
-- expired row becomes the new notification; a put replacing a live notification logs the kind
-- 'replaced' (read back as an UPDATED change with `replaced` set). Every change gets one outbox
-- row (the `outboxed` step).
--
-- Locking: the head rows of all users of the call are locked first, in one statement and in byte
-- order of user id (COLLATE "C", the order of Python's sorted()), as every other writer does, so
-- writers never deadlock. The same statement reserves one position per put; an EXPIRED change
-- takes one more. Positions come from those rows (never a sequence): gap-free, in commit order.
--
-- Applied with CREATE OR REPLACE after the migrations, at every open whose copy differs
-- (postgres/schema.py). A change of its signature (arguments, result) needs a migration that
-- drops the old one first; any change to this file needs a new migration (docs/storage.md).
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
    p_origin text[],
    p_entries boolean
) RETURNS TABLE (o_ord bigint, o_id text, o_version integer, o_created_at timestamptz,
                 o_created boolean, o_position bigint, o_seq bigint, o_pushable boolean,
                 o_first boolean)
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
            upd.expired AS created, upd.orig, upd.expired AS lapsed
        FROM upd
        UNION ALL
        SELECT cur.i, cur.u, cur.a, cur.at, cur.nid, 1, cur.at, true, cur.orig, false
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
        RETURNING user_id, position, kind, notification_id
    ), outboxed AS (
        -- One outbox row per change. The sort runs below the insert, so seqs are drawn in
        -- position order; and after the head locks, so a user's later calls draw larger seqs.
        INSERT INTO outbox (user_id, position)
        SELECT a.user_id, a.position FROM appended a ORDER BY a.user_id, a.position
        RETURNING seq, user_id, position
    ), moved AS (
        -- EXPIRED changes were not reserved: move those heads further.
        UPDATE feed_heads h SET position = h.position + x.n
        FROM (SELECT upd.u, count(*) AS n FROM upd WHERE upd.expired GROUP BY upd.u) AS x
        WHERE h.user_id = x.u
    )
    -- What the dispatcher needs, if the caller asks (`p_entries`: a call of a few puts, posts
    -- that trickle in, where a round trip saved is latency saved). Otherwise NULLs, and this
    -- costs nothing (a false constant: the lateral query never runs): under load the dispatcher
    -- reads the outbox in bulk anyway, and over many puts these nested loops over the call's
    -- rows would be quadratic in their number.
    SELECT w.i, w.id, w.version, w.created_date_time, w.created, e.position, e.seq,
        e.state[1], e.state[2]
    FROM written w
    LEFT JOIN LATERAL (
        SELECT a.position, CASE WHEN w.lapsed THEN NULL ELSE ob.seq END AS seq,
            herald_entry_state(w.u, w.a) AS state
        FROM appended a JOIN outboxed ob ON ob.user_id = a.user_id AND ob.position = a.position
        WHERE p_entries AND a.user_id = w.u AND a.notification_id = w.id AND a.kind <> 'expired'
    ) AS e ON true;
END
$$;
