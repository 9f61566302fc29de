-- Herald schema 6 (SQLite): what the processes sharing a PostgreSQL database agree on besides the
-- data (docs/architecture.md "Cluster-wide state"); SQLite has one process, but the same
-- contract. Datetimes are integer microseconds since the epoch, UTC.

-- The embedded issuer's signing key (a private JWK), written once. (With SQLite Herald keeps
-- using the key file in the data directory.)
CREATE TABLE issuer_keys (
    name TEXT PRIMARY KEY,
    secret BLOB NOT NULL,
    created INTEGER NOT NULL
);

-- Sign-in codes already redeemed (their jti), kept until they expire: a code works once, even
-- after a restart.
CREATE TABLE redeemed_codes (
    code_id TEXT PRIMARY KEY,
    expires INTEGER NOT NULL
);

-- When a periodic job (the expiry sweeper) last ran.
CREATE TABLE turns (
    name TEXT PRIMARY KEY,
    at INTEGER NOT NULL
);

-- A number that grows whenever subscriptions are removed (the same contract as PostgreSQL's;
-- a SQLite Herald is one process and does not read it).
CREATE TABLE subscription_removals (n INTEGER NOT NULL);
INSERT INTO subscription_removals VALUES (0);
CREATE TRIGGER subscriptions_removed AFTER DELETE ON subscriptions
BEGIN
    UPDATE subscription_removals SET n = n + 1;
END;
