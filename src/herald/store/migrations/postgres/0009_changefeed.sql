-- Herald schema 9 (PostgreSQL): the app-wide change feed and webhooks (docs/api.md "Change
-- feed").

-- Changes appended but not yet given their place in the feed: written in the change's
-- transaction (by the trigger below), moved to app_changes by `stamp` (store/postgres/feed.py).
-- A sequence alone would not do: concurrent transactions commit out of sequence order, so a
-- reader that saw seq 11 could later miss 10. One stamper at a time (an advisory lock) numbers
-- what has committed, so seqs commit in order.
-- `appended` orders them: taken when the change is written, which for one user is in position
-- order (the user's head stays locked until the change commits), and across users is the order
-- they were written in.
CREATE TABLE app_changes_pending (
    appended bigint GENERATED ALWAYS AS IDENTITY,
    user_id text COLLATE "C" NOT NULL,
    position bigint NOT NULL,
    app text COLLATE "C" NOT NULL,
    at timestamptz NOT NULL
);

CREATE TABLE app_changes (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    app text COLLATE "C" NOT NULL,
    user_id text COLLATE "C" NOT NULL,
    position bigint NOT NULL,
    at timestamptz NOT NULL
);
CREATE INDEX app_changes_app ON app_changes (app, seq);

-- The apps whose changes are recorded: those that use the feed (a webhook, a read of the pull
-- feed), from then on (store/postgres/changefeed.py `enable_feed`).
CREATE TABLE app_feeds (
    app text COLLATE "C" PRIMARY KEY,
    since timestamptz NOT NULL
);

CREATE FUNCTION herald_changes_pending() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM app_feeds) THEN
        INSERT INTO app_changes_pending (user_id, position, app, at)
            SELECT a.user_id, a.position, a.app, a.at FROM appended a
            WHERE EXISTS (SELECT 1 FROM app_feeds f WHERE f.app = a.app)
            ORDER BY a.user_id, a.position;
    END IF;
    RETURN NULL;
END
$$;
-- Per statement: a put batch appends its changes in one statement, so this is one more insert
-- per batch, not per change.
CREATE TRIGGER changes_feed AFTER INSERT ON changes REFERENCING NEW TABLE AS appended
    FOR EACH STATEMENT EXECUTE FUNCTION herald_changes_pending();

CREATE TABLE app_changes_horizon (pruned bigint NOT NULL);
INSERT INTO app_changes_horizon VALUES (0);

CREATE TABLE webhooks (
    id text COLLATE "C" PRIMARY KEY,
    app text COLLATE "C" NOT NULL,
    url text NOT NULL,
    secret text NOT NULL,
    kinds text NOT NULL,
    status text NOT NULL,
    cursor bigint NOT NULL,
    created_date_time timestamptz NOT NULL,
    last_modified_date_time timestamptz NOT NULL,
    failures integer NOT NULL DEFAULT 0,
    failing_since timestamptz,
    next_attempt timestamptz,
    last_attempt timestamptz,
    last_success timestamptz,
    last_status integer,
    last_error text
);
CREATE INDEX webhooks_app ON webhooks (app);
