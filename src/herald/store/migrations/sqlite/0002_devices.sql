-- Herald schema 2 (SQLite): devices. Datetimes are integer microseconds since the epoch, UTC.

-- The subscription (device) that made a change, so its own live stream can skip it.
ALTER TABLE changes ADD COLUMN origin TEXT;

-- One row per appended change, written in the change's transaction and removed once dispatched.
-- seq is the rowid (no AUTOINCREMENT): a new row gets max(seq) + 1, and the single writer commits
-- in that order, so seq order is commit order among the rows present. Seqs of removed rows may be
-- used again; nothing keeps them.
CREATE TABLE outbox (
    seq INTEGER PRIMARY KEY,
    user_id TEXT NOT NULL,
    position INTEGER NOT NULL
);

CREATE TABLE subscriptions (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    app TEXT NOT NULL,
    platform TEXT NOT NULL,
    display_name TEXT,
    push_channel TEXT,  -- msgspec JSON of the tagged PushChannel union; NULL: live only
    channel_key TEXT,   -- the channel's `key` (endpoint, token, URI); NULL: no channel
    expiration_date_time INTEGER NOT NULL,
    created_date_time INTEGER NOT NULL,
    last_modified_date_time INTEGER NOT NULL
);
-- A push channel reaches one device: one subscription per (app, key), expired ones included
-- (a write that finds an expired holder deletes it first).
CREATE UNIQUE INDEX subscriptions_channel ON subscriptions (app, channel_key)
    WHERE channel_key IS NOT NULL;
CREATE INDEX subscriptions_owner ON subscriptions (user_id, app);
CREATE INDEX subscriptions_expiry ON subscriptions (expiration_date_time);
