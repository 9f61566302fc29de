-- Herald schema 1 (PostgreSQL).
CREATE TABLE apps (
    client_id text PRIMARY KEY,
    host_name text NOT NULL UNIQUE,
    display_name text NOT NULL,
    secret_hash text NOT NULL,
    created_date_time timestamptz NOT NULL
);

CREATE TABLE notifications (
    id text PRIMARY KEY,
    user_id text NOT NULL,
    app text NOT NULL,
    app_notification_id text NOT NULL,
    target_host_name text NOT NULL,
    group_name text,
    priority text NOT NULL,
    read_state text NOT NULL,
    user_action_state text NOT NULL,
    created_date_time timestamptz NOT NULL,
    last_modified_date_time timestamptz NOT NULL,
    expiration_date_time timestamptz NOT NULL,
    version integer NOT NULL,
    content bytea NOT NULL,
    UNIQUE (user_id, app, app_notification_id)
);
CREATE INDEX notifications_feed ON notifications (user_id, app, created_date_time DESC, id);
CREATE INDEX notifications_group ON notifications (user_id, app, group_name);
CREATE INDEX notifications_expiry ON notifications (expiration_date_time);

-- One row per user: the newest change position and the position up to which the log was pruned.
-- Writers lock these rows (in user id order) before touching a user's feed: positions are
-- allocated here, never from a sequence, so they commit gap-free and in order.
CREATE TABLE feed_heads (
    user_id text PRIMARY KEY,
    position bigint NOT NULL DEFAULT 0,
    pruned bigint NOT NULL DEFAULT 0
);

CREATE TABLE changes (
    user_id text NOT NULL,
    position bigint NOT NULL,
    kind text NOT NULL,
    app text NOT NULL,
    notification_id text NOT NULL,
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
