-- Herald schema 1 (PostgreSQL).
CREATE TABLE apps (
    client_id text PRIMARY KEY,
    host_name text NOT NULL UNIQUE,
    display_name text NOT NULL,
    secret_hash text NOT NULL,
    created_date_time timestamptz NOT NULL
);

-- Identifiers compare byte-wise (COLLATE "C"): cheaper in every index, and the order SQLite uses.
CREATE TABLE notifications (
    id text COLLATE "C" PRIMARY KEY,
    user_id text COLLATE "C" NOT NULL,
    app text COLLATE "C" NOT NULL,
    app_notification_id text COLLATE "C" NOT NULL,
    target_host_name text NOT NULL,
    group_name text COLLATE "C",
    priority text NOT NULL,
    read_state text NOT NULL,
    user_action_state text NOT NULL,
    created_date_time timestamptz NOT NULL,
    last_modified_date_time timestamptz NOT NULL,
    expiration_date_time timestamptz NOT NULL,
    version integer NOT NULL,
    content bytea NOT NULL
);
-- The (user, app, appNotificationId) key, unique, as one array-valued expression: a put finds the
-- row it replaces through this index and no other (with the key as three columns, the planner,
-- before the table has statistics, may prefer another (user_id, app, ...) index and scan every
-- row of the user's feed).
CREATE UNIQUE INDEX notifications_key ON notifications ((ARRAY[user_id, app, app_notification_id]));
CREATE INDEX notifications_feed ON notifications (user_id, app, created_date_time DESC, id);
-- Partial: notifications without a group need no entry.
CREATE INDEX notifications_group ON notifications (user_id, app, group_name)
    WHERE group_name IS NOT NULL;
CREATE INDEX notifications_expiry ON notifications (expiration_date_time);

-- One row per user: the newest change position and the position up to which the log was pruned.
-- Writers lock these rows (in user id order) before touching a user's feed: positions are
-- allocated here, never from a sequence, so they commit gap-free and in order.
CREATE TABLE feed_heads (
    user_id text COLLATE "C" PRIMARY KEY,
    position bigint NOT NULL DEFAULT 0,
    pruned bigint NOT NULL DEFAULT 0
);

CREATE TABLE changes (
    user_id text COLLATE "C" NOT NULL,
    position bigint NOT NULL,
    kind text NOT NULL,
    app text COLLATE "C" NOT NULL,
    notification_id text COLLATE "C" NOT NULL,
    at timestamptz NOT NULL,
    PRIMARY KEY (user_id, position)
);
CREATE INDEX changes_at ON changes (at);

CREATE TABLE idempotency (
    scope text NOT NULL,
    key text NOT NULL,
    fingerprint text NOT NULL,
    status integer NOT NULL,
    body bytea NOT NULL,
    location text,
    expires timestamptz NOT NULL,
    PRIMARY KEY (scope, key)
);
CREATE INDEX idempotency_expires ON idempotency (expires);

-- herald_put_batch, which writes puts, is not part of a migration: it is applied after them
-- (store/postgres/functions/).
