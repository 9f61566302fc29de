-- Herald schema 1 (SQLite). Datetimes are integer microseconds since the epoch, UTC.
CREATE TABLE apps (
    client_id TEXT PRIMARY KEY,
    host_name TEXT NOT NULL UNIQUE,
    display_name TEXT NOT NULL,
    secret_hash TEXT NOT NULL,
    created_date_time INTEGER NOT NULL
);

CREATE TABLE notifications (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    app TEXT NOT NULL,
    app_notification_id TEXT NOT NULL,
    target_host_name TEXT NOT NULL,
    group_name TEXT,
    priority TEXT NOT NULL,
    read_state TEXT NOT NULL,
    user_action_state TEXT NOT NULL,
    created_date_time INTEGER NOT NULL,
    last_modified_date_time INTEGER NOT NULL,
    expiration_date_time INTEGER NOT NULL,
    version INTEGER NOT NULL,
    content BLOB NOT NULL,
    UNIQUE (user_id, app, app_notification_id)
);
-- Listing a feed newest first must not sort the whole feed (reads run on the event loop), so
-- this index is worth its cost on writes (each index is a scattered page per insert).
CREATE INDEX notifications_feed ON notifications (user_id, app, created_date_time DESC, id);
CREATE INDEX notifications_expiry ON notifications (expiration_date_time);

-- Written only when the log is pruned: the newest pruned position per user. The next position of
-- a user is max(changes.position, feed_heads.position) + 1, so the hot path writes no head row.
CREATE TABLE feed_heads (
    user_id TEXT PRIMARY KEY,
    position INTEGER NOT NULL DEFAULT 0,
    pruned INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;

CREATE TABLE changes (
    user_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    kind TEXT NOT NULL,
    app TEXT NOT NULL,
    notification_id TEXT NOT NULL,
    at INTEGER NOT NULL,
    PRIMARY KEY (user_id, position)
) WITHOUT ROWID;
CREATE INDEX changes_at ON changes (at);

CREATE TABLE idempotency (
    scope TEXT NOT NULL,
    key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    status INTEGER NOT NULL,
    body BLOB NOT NULL,
    location TEXT,
    expires INTEGER NOT NULL,
    PRIMARY KEY (scope, key)
) WITHOUT ROWID;
CREATE INDEX idempotency_expires ON idempotency (expires);
