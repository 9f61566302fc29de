-- herald_entry_state: for herald_put_batch's answer to the dispatcher (`Outbox.on_outboxed`), of
-- a put's new outbox entry: whether its (user, app) has a push target (a subscription with a
-- push channel, not gone), and whether it is its user's first entry left in the outbox. The
-- outbox probe looks at no more than 32 entries of the user's shard: past that it says false,
-- which costs only the shortcut, so a backlog does not make a put scan it.
--
-- STABLE: its queries run on the calling statement's snapshot, so they see the entries committed
-- before herald_put_batch's statement (earlier changes of the user: it holds the user's head
-- lock) and not the ones that statement inserts. A function of its own, never inlined, so that
-- a call of herald_put_batch that does not ask for it opens none of these tables and indexes
-- (inlined, that cost every call of 20 puts 3.5 %).
--
-- Applied with CREATE OR REPLACE after the migrations (postgres/schema.py). A change of its
-- signature needs a migration that drops the old one first (docs/storage.md).
CREATE OR REPLACE FUNCTION herald_entry_state(p_user text, p_app text) RETURNS boolean[]
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    RETURN ARRAY[
        EXISTS (SELECT FROM subscriptions s WHERE s.user_id = p_user AND s.app = p_app
                AND s.push_channel IS NOT NULL AND s.gone IS NULL),
        (SELECT count(*) < 32 AND bool_and(x.user_id <> p_user) IS NOT FALSE
         FROM (SELECT o.user_id FROM outbox o
               WHERE o.shard = (hashtextextended(p_user, 0) & 63)::smallint
               ORDER BY o.seq LIMIT 32) AS x)
    ];
END
$$;
