-- Herald schema 7 (SQLite): notification preferences per user and app, and the alerting pushes
-- held during quiet hours (store/contract.py `Preferences`). Datetimes are integer microseconds
-- since the epoch, UTC.

-- The preferences document (msgspec JSON of preferences.NotificationPreferences); `version`
-- counts writes (the ETag).
CREATE TABLE notification_preferences (
    user_id TEXT NOT NULL,
    app TEXT NOT NULL,
    preferences TEXT NOT NULL,
    version INTEGER NOT NULL,
    last_modified INTEGER NOT NULL,
    PRIMARY KEY (user_id, app)
);

-- One row per held alert (subscription, change), queued in the transaction that removes the
-- change's outbox entry, as deliveries are; released (deleted, one summary per subscription
-- queued) from `release_at` on. No foreign key: a held push of a deleted subscription is dropped
-- at its release.
CREATE TABLE held_pushes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    subscription_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    app TEXT NOT NULL,
    provider TEXT NOT NULL,
    notification_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    expires INTEGER NOT NULL,
    release_at INTEGER NOT NULL
);
CREATE INDEX held_pushes_release ON held_pushes (release_at, subscription_id);
CREATE INDEX held_pushes_owner ON held_pushes (user_id, app);
