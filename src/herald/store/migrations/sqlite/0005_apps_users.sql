-- Herald schema 5 (SQLite): apps with several client ids; user principal names; GUID user ids in
-- lower case. Datetimes are integer microseconds since the epoch, UTC.

-- A cross-device app is its host name (targetHostName). Each of its client ids (one per
-- platform: Windows, iOS, Android, web...) authenticates as the app, with a secret of its own,
-- and sees the same feeds, subscriptions and push credentials (all keyed by host name).
CREATE TABLE app_clients (
    client_id TEXT PRIMARY KEY,
    host_name TEXT NOT NULL,
    platform TEXT,  -- a label for people ("windows", "iOS"...); NULL: none given
    secret_hash TEXT NOT NULL,
    created_date_time INTEGER NOT NULL
);
CREATE INDEX app_clients_host ON app_clients (host_name, created_date_time);
INSERT INTO app_clients (client_id, host_name, platform, secret_hash, created_date_time)
    SELECT client_id, host_name, NULL, secret_hash, created_date_time FROM apps;
CREATE TABLE apps_5 (
    host_name TEXT PRIMARY KEY,
    display_name TEXT NOT NULL,
    created_date_time INTEGER NOT NULL
);
INSERT INTO apps_5 (host_name, display_name, created_date_time)
    SELECT host_name, display_name, created_date_time FROM apps;
DROP TABLE apps;
ALTER TABLE apps_5 RENAME TO apps;

-- User principal names (lower case) and the user id each names: learned from delegated tokens
-- (`upn`, `preferred_username`) or set with `herald user set`, which pins it (tokens then leave
-- it alone).
CREATE TABLE user_names (
    upn TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    pinned INTEGER NOT NULL DEFAULT 0,
    updated INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX user_names_user ON user_names (user_id);

-- GUID user ids are case-insensitive (as in Graph) and now stored in lower case. Rename the
-- feeds of upper- or mixed-case GUIDs, unless the lower-case id (or another spelling of it) has
-- data too: two change logs cannot be merged (their positions overlap), so such a spelling is
-- left as it was (docs/storage.md, "User ids").
CREATE TEMP TABLE user_ids_5 AS
    SELECT user_id FROM notifications UNION SELECT user_id FROM changes
    UNION SELECT user_id FROM feed_heads UNION SELECT user_id FROM subscriptions;
CREATE TEMP TABLE renamed_5 AS
    SELECT user_id AS old, lower(user_id) AS new FROM user_ids_5
    WHERE user_id <> lower(user_id)
      AND user_id GLOB '[0-9A-Fa-f][0-9A-Fa-f][0-9A-Fa-f][0-9A-Fa-f][0-9A-Fa-f][0-9A-Fa-f][0-9A-Fa-f][0-9A-Fa-f]-[0-9A-Fa-f][0-9A-Fa-f][0-9A-Fa-f][0-9A-Fa-f]-[0-9A-Fa-f][0-9A-Fa-f][0-9A-Fa-f][0-9A-Fa-f]-[0-9A-Fa-f][0-9A-Fa-f][0-9A-Fa-f][0-9A-Fa-f]-[0-9A-Fa-f][0-9A-Fa-f][0-9A-Fa-f][0-9A-Fa-f][0-9A-Fa-f][0-9A-Fa-f][0-9A-Fa-f][0-9A-Fa-f][0-9A-Fa-f][0-9A-Fa-f][0-9A-Fa-f][0-9A-Fa-f]'
      AND (SELECT count(*) FROM user_ids_5 AS o WHERE lower(o.user_id) = lower(user_ids_5.user_id)) = 1;
UPDATE notifications SET user_id = lower(user_id) WHERE user_id IN (SELECT old FROM renamed_5);
UPDATE changes SET user_id = lower(user_id) WHERE user_id IN (SELECT old FROM renamed_5);
UPDATE feed_heads SET user_id = lower(user_id) WHERE user_id IN (SELECT old FROM renamed_5);
UPDATE subscriptions SET user_id = lower(user_id) WHERE user_id IN (SELECT old FROM renamed_5);
UPDATE outbox SET user_id = lower(user_id) WHERE user_id IN (SELECT old FROM renamed_5);
UPDATE deliveries SET user_id = lower(user_id) WHERE user_id IN (SELECT old FROM renamed_5);
DROP TABLE renamed_5;
DROP TABLE user_ids_5;
