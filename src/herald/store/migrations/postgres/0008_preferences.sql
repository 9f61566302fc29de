-- Herald schema 8 (PostgreSQL): notification preferences per user and app, and the alerting
-- pushes held during quiet hours (store/contract.py `Preferences`).

-- The preferences document (msgspec JSON of preferences.NotificationPreferences); `version`
-- counts writes (the ETag).
CREATE TABLE notification_preferences (
    user_id text COLLATE "C" NOT NULL,
    app text COLLATE "C" NOT NULL,
    preferences text NOT NULL,
    version integer NOT NULL,
    last_modified timestamptz NOT NULL,
    PRIMARY KEY (user_id, app)
);

-- One row per held alert (subscription, change), queued in the transaction that removes the
-- change's outbox row, as deliveries are; released (deleted, one summary per subscription
-- queued) from `release_at` on, by one transaction (DELETE ... RETURNING: a row is released
-- once, whichever node gets it). No foreign key: a held push of a deleted subscription is
-- dropped at its release.
CREATE TABLE held_pushes (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    subscription_id text COLLATE "C" NOT NULL,
    user_id text COLLATE "C" NOT NULL,
    app text COLLATE "C" NOT NULL,
    provider text NOT NULL,
    notification_id text COLLATE "C" NOT NULL,
    position bigint NOT NULL,
    expires timestamptz NOT NULL,
    release_at timestamptz NOT NULL
);
CREATE INDEX held_pushes_release ON held_pushes (release_at, subscription_id);
CREATE INDEX held_pushes_owner ON held_pushes (user_id, app);
