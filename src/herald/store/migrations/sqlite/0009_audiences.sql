-- Herald schema 9 (SQLite): audiences and sends to many users (docs/api.md "Audiences").
-- Datetimes are integer microseconds since the epoch, UTC.

-- A named set of users an app maintains.
CREATE TABLE audiences (
    app TEXT NOT NULL,
    id TEXT NOT NULL,
    display_name TEXT,
    created INTEGER NOT NULL,
    PRIMARY KEY (app, id)
) WITHOUT ROWID;

CREATE TABLE audience_members (
    app TEXT NOT NULL,
    audience TEXT NOT NULL,
    user_id TEXT NOT NULL,
    PRIMARY KEY (app, audience, user_id)
) WITHOUT ROWID;

-- One request to reach many users: its content, its recipients (a snapshot) and how far the
-- runner has got. `idempotency_key` is unique per app while the operation is kept.
CREATE TABLE sends (
    id TEXT PRIMARY KEY,
    app TEXT NOT NULL,
    idempotency_key TEXT,
    fingerprint TEXT NOT NULL,
    audience TEXT,
    content BLOB NOT NULL,
    total INTEGER NOT NULL,
    done INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    status TEXT NOT NULL,
    created INTEGER NOT NULL,
    last_action INTEGER NOT NULL,
    finished INTEGER
);
CREATE UNIQUE INDEX sends_key ON sends (app, idempotency_key);
CREATE INDEX sends_unfinished ON sends (created) WHERE finished IS NULL;

CREATE TABLE send_recipients (
    send_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    user_id TEXT NOT NULL,
    PRIMARY KEY (send_id, seq)
) WITHOUT ROWID;

CREATE TABLE send_failures (
    send_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    code TEXT NOT NULL,
    message TEXT NOT NULL,
    PRIMARY KEY (send_id, user_id)
) WITHOUT ROWID;
