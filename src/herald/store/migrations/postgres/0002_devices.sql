-- Herald schema 2 (PostgreSQL): devices.

-- The subscription (device) that made a change, so its own live stream can skip it.
ALTER TABLE changes ADD COLUMN origin text COLLATE "C";

-- One row per appended change, written in the change's transaction and removed once dispatched.
-- seq comes from a sequence, so it is not commit order across users (a smaller seq may commit
-- later); nothing relies on that. Per user it is: every writer draws seqs after locking the user's
-- feed_heads row, so a user's later transaction draws larger seqs, and within one transaction
-- seqs are drawn in position order. `pending` reads by seq and so yields each user's changes in
-- position order. Keep the sequence's CACHE at 1: with per-session cached blocks a later
-- transaction could draw a smaller seq.
CREATE TABLE outbox (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id text COLLATE "C" NOT NULL,
    position bigint NOT NULL
);

CREATE TABLE subscriptions (
    id text COLLATE "C" PRIMARY KEY,
    user_id text COLLATE "C" NOT NULL,
    app text COLLATE "C" NOT NULL,
    platform text NOT NULL,
    display_name text,
    push_channel text,         -- msgspec JSON of the tagged PushChannel union; NULL: live only
    channel_key text COLLATE "C",  -- the channel's `key` (endpoint, token, URI); NULL: no channel
    expiration_date_time timestamptz NOT NULL,
    created_date_time timestamptz NOT NULL,
    last_modified_date_time timestamptz NOT NULL
);
-- A push channel reaches one device: one subscription per (app, key), expired ones included
-- (a write that finds an expired holder deletes it first).
CREATE UNIQUE INDEX subscriptions_channel ON subscriptions (app, channel_key)
    WHERE channel_key IS NOT NULL;
CREATE INDEX subscriptions_owner ON subscriptions (user_id, app);
CREATE INDEX subscriptions_expiry ON subscriptions (expiration_date_time);

-- herald_put_batch gained an argument (each put's origin) and writes outbox rows: a new
-- argument makes a new function, so the one of schema 1 goes (the new one is applied after the
-- migrations, from store/postgres/functions/).
DROP FUNCTION IF EXISTS herald_put_batch(text[], text[], text[], text[], text[], text[], text[],
    timestamptz[], timestamptz[], bytea[]);
