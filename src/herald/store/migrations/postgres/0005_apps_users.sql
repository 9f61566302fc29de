-- Herald schema 5 (PostgreSQL): apps with several client ids; user principal names; GUID user
-- ids in lower case.

-- A cross-device app is its host name (targetHostName). Each of its client ids (one per
-- platform: Windows, iOS, Android, web...) authenticates as the app, with a secret of its own,
-- and sees the same feeds, subscriptions and push credentials (all keyed by host name).
CREATE TABLE app_clients (
    client_id text PRIMARY KEY,
    host_name text NOT NULL,
    platform text,  -- a label for people ("windows", "iOS"...); NULL: none given
    secret_hash text NOT NULL,
    created_date_time timestamptz NOT NULL
);
CREATE INDEX app_clients_host ON app_clients (host_name, created_date_time);
INSERT INTO app_clients (client_id, host_name, platform, secret_hash, created_date_time)
    SELECT client_id, host_name, NULL, secret_hash, created_date_time FROM apps;
ALTER TABLE apps DROP CONSTRAINT apps_pkey;
ALTER TABLE apps DROP COLUMN client_id;
ALTER TABLE apps DROP COLUMN secret_hash;
ALTER TABLE apps DROP CONSTRAINT apps_host_name_key;
ALTER TABLE apps ADD PRIMARY KEY (host_name);

-- User principal names (lower case) and the user id each names: learned from delegated tokens
-- (`upn`, `preferred_username`) or set with `herald user set`, which pins it (tokens then leave
-- it alone).
CREATE TABLE user_names (
    upn text PRIMARY KEY,
    user_id text COLLATE "C" NOT NULL,
    pinned boolean NOT NULL DEFAULT false,
    updated timestamptz NOT NULL
);
CREATE INDEX user_names_user ON user_names (user_id);

-- GUID user ids are case-insensitive (as in Graph) and now stored in lower case. Rename the
-- feeds of upper- or mixed-case GUIDs, unless the lower-case id (or another spelling of it) has
-- data too: two change logs cannot be merged (their positions overlap), so such a spelling is
-- left as it was (docs/storage.md, "User ids").
CREATE TEMP TABLE renamed_5 ON COMMIT DROP AS
    WITH ids AS (
        SELECT user_id FROM notifications UNION SELECT user_id FROM changes
        UNION SELECT user_id FROM feed_heads UNION SELECT user_id FROM subscriptions
    )
    SELECT min(user_id) AS old FROM ids
    WHERE user_id ~ '^[0-9A-Fa-f]{8}-([0-9A-Fa-f]{4}-){3}[0-9A-Fa-f]{12}$'
    GROUP BY lower(user_id)
    HAVING count(*) = 1 AND min(user_id) <> lower(min(user_id));
UPDATE notifications SET user_id = lower(user_id) WHERE user_id IN (SELECT old FROM renamed_5);
UPDATE changes SET user_id = lower(user_id) WHERE user_id IN (SELECT old FROM renamed_5);
UPDATE feed_heads SET user_id = lower(user_id) WHERE user_id IN (SELECT old FROM renamed_5);
UPDATE subscriptions SET user_id = lower(user_id) WHERE user_id IN (SELECT old FROM renamed_5);
UPDATE outbox SET user_id = lower(user_id) WHERE user_id IN (SELECT old FROM renamed_5);
UPDATE deliveries SET user_id = lower(user_id) WHERE user_id IN (SELECT old FROM renamed_5);
