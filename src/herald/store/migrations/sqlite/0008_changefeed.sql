-- Herald schema 8 (SQLite): the app-wide change feed and webhooks (docs/api.md "Change feed").
-- Datetimes are integer microseconds since the epoch, UTC.

-- One row per change, in commit order: the single writer appends (in the change's transaction,
-- by the trigger below), so a new row's seq (rowid: max + 1) orders it after every row already
-- committed. Pruning removes a prefix and always keeps the newest row, so a seq is never reused.
CREATE TABLE app_changes (
    seq INTEGER PRIMARY KEY,
    app TEXT NOT NULL,
    user_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    at INTEGER NOT NULL
);
CREATE INDEX app_changes_app ON app_changes (app, seq);

-- The apps whose changes are recorded: those that use the feed (a webhook, a read of the pull
-- feed), from then on. Others pay one lookup in this small table per change, not a row.
CREATE TABLE app_feeds (
    app TEXT PRIMARY KEY,
    since INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TRIGGER changes_feed AFTER INSERT ON changes
    WHEN EXISTS (SELECT 1 FROM app_feeds WHERE app = NEW.app)
BEGIN
    INSERT INTO app_changes (app, user_id, position, at)
        VALUES (NEW.app, NEW.user_id, NEW.position, NEW.at);
END;

-- The newest seq pruned from app_changes: a cursor below it is behind the horizon.
CREATE TABLE app_changes_horizon (pruned INTEGER NOT NULL);
INSERT INTO app_changes_horizon VALUES (0);

-- An app's webhooks: where to POST its change feed, and how far delivery got.
CREATE TABLE webhooks (
    id TEXT PRIMARY KEY,
    app TEXT NOT NULL,
    url TEXT NOT NULL,
    secret TEXT NOT NULL,
    kinds TEXT NOT NULL,      -- change types delivered, comma-separated
    status TEXT NOT NULL,     -- active, failed (gave up), disabled
    cursor INTEGER NOT NULL,  -- the app_changes seq delivered up to
    created_date_time INTEGER NOT NULL,
    last_modified_date_time INTEGER NOT NULL,
    failures INTEGER NOT NULL DEFAULT 0,
    failing_since INTEGER,
    next_attempt INTEGER,
    last_attempt INTEGER,
    last_success INTEGER,
    last_status INTEGER,
    last_error TEXT
);
CREATE INDEX webhooks_app ON webhooks (app);
