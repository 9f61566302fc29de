-- Herald schema 3 (PostgreSQL): push delivery.

-- How pushes to the subscription's channel have gone (Subscription.delivery), and the newest
-- change position the device is known to have fetched (Subscription.seen_position).
ALTER TABLE subscriptions
    ADD COLUMN last_delivered timestamptz,
    ADD COLUMN consecutive_failures integer NOT NULL DEFAULT 0,
    ADD COLUMN last_error text,
    ADD COLUMN gone timestamptz,  -- set: the push service said the channel is gone
    ADD COLUMN seen_position bigint NOT NULL DEFAULT 0;

-- Queued pushes, one per (change, subscription), inserted in the transaction that removes the
-- change's outbox row (only if that transaction removed it: two nodes draining the outbox never
-- queue one change twice) and deleted once settled. `due` is when it may be claimed next (a claim
-- moves it to the end of its lease; claims lock with SKIP LOCKED, so nodes never take the same
-- row). No foreign key to subscriptions: a subscription deleted after fan-out must not fail the
-- dispatch; its deliveries are deleted with it, and `claim` purges any left over.
CREATE TABLE deliveries (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    subscription_id text COLLATE "C" NOT NULL,
    user_id text COLLATE "C" NOT NULL,
    app text COLLATE "C" NOT NULL,
    provider text NOT NULL,
    message text NOT NULL,         -- msgspec JSON of model.Message
    notification_id text COLLATE "C" NOT NULL,  -- the message's notification and change
    position bigint NOT NULL,                   -- position: a later change supersedes it
    expires timestamptz NOT NULL,  -- the message's `expires`: claim purges it from then on
    due timestamptz NOT NULL,
    attempts integer NOT NULL DEFAULT 0,  -- claims so far: a settle applies to the latest only
    created timestamptz NOT NULL
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
    app text COLLATE "C" NOT NULL,
    kind text NOT NULL,
    secret bytea NOT NULL,
    updated timestamptz NOT NULL,
    PRIMARY KEY (app, kind)
);

-- (herald_put_batch now logs a put that replaces a live notification as 'replaced': see
-- store/postgres/functions/herald_put_batch.sql.)
