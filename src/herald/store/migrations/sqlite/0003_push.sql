-- Herald schema 3 (SQLite): push delivery. Datetimes are integer microseconds since the epoch, UTC.

-- How pushes to the subscription's channel have gone (Subscription.delivery), and the newest
-- change position the device is known to have fetched (Subscription.seen_position).
ALTER TABLE subscriptions ADD COLUMN last_delivered INTEGER;
ALTER TABLE subscriptions ADD COLUMN consecutive_failures INTEGER NOT NULL DEFAULT 0;
ALTER TABLE subscriptions ADD COLUMN last_error TEXT;
ALTER TABLE subscriptions ADD COLUMN gone INTEGER;  -- set: the push service said it is gone
ALTER TABLE subscriptions ADD COLUMN seen_position INTEGER NOT NULL DEFAULT 0;

-- Queued pushes, one per (change, subscription), inserted in the transaction that removes the
-- change's outbox row (only if that transaction removed it: two processes draining the outbox
-- never queue one change twice) and deleted once settled. `due` is when it may be claimed next (a
-- claim moves it to the end of its lease). No foreign key to subscriptions: a subscription
-- deleted after fan-out must not fail the dispatch; its deliveries are deleted with it, and
-- `claim` purges any left over. AUTOINCREMENT: an id is never used again, so a late settle of a
-- removed delivery cannot touch a newer one.
CREATE TABLE deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    subscription_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    app TEXT NOT NULL,
    provider TEXT NOT NULL,
    message TEXT NOT NULL,   -- msgspec JSON of model.Message
    notification_id TEXT NOT NULL,  -- the message's notification and change position: a later
    position INTEGER NOT NULL,      -- change of the notification supersedes it
    expires INTEGER NOT NULL,  -- the message's `expires`: claim purges it from then on
    due INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,  -- claims so far: a settle applies to the latest only
    created INTEGER NOT NULL
);
CREATE INDEX deliveries_due ON deliveries (provider, due, id);
-- By subscription (deleting a subscription's deliveries), and by subscription and notification:
-- superseding, which finds a user's queued deliveries of a notification through the user's
-- subscriptions (a delivery's subscription is always its user's; one whose subscription was
-- deleted is never sent, `claim` purges it). No index of its own: every claim moves `due`, so
-- each index on this table is written per claim.
CREATE INDEX deliveries_subscription ON deliveries (subscription_id, notification_id);

-- Push credentials per app (host name) and kind ("vapid", "apns", "fcm", "wns"): opaque bytes.
CREATE TABLE push_credentials (
    app TEXT NOT NULL,
    kind TEXT NOT NULL,
    secret BLOB NOT NULL,
    updated INTEGER NOT NULL,
    PRIMARY KEY (app, kind)
) WITHOUT ROWID;
