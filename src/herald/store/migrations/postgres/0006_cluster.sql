-- Herald schema 6 (PostgreSQL): what the processes sharing this database agree on besides the
-- data (docs/architecture.md "Cluster-wide state").

-- The embedded issuer's signing key (a private JWK), written once by the first process to start:
-- every node signs and verifies with it, so a token minted via one is accepted by all.
CREATE TABLE issuer_keys (
    name text PRIMARY KEY,
    secret bytea NOT NULL,
    created timestamptz NOT NULL
);

-- Sign-in codes already redeemed (their jti), kept until they expire: a code works once.
CREATE TABLE redeemed_codes (
    code_id text PRIMARY KEY,
    expires timestamptz NOT NULL
);

-- When a periodic job (the expiry sweeper) last ran, on any node: a process takes its turn only
-- once the interval has passed since.
CREATE TABLE turns (
    name text PRIMARY KEY,
    at timestamptz NOT NULL
);

-- A number that grows with every statement that removes subscriptions (a delete, a shared
-- browser's channel taken over, an app deleted, the sweeper): each node reads it twice a second
-- and checks its streams' subscriptions only when it moved (outbound/streams.py).
CREATE TABLE subscription_removals (n bigint NOT NULL);
INSERT INTO subscription_removals VALUES (0);
CREATE OR REPLACE FUNCTION herald_count_subscription_removals() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM removed) THEN
        UPDATE subscription_removals SET n = n + 1;
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER subscriptions_removed AFTER DELETE ON subscriptions
    REFERENCING OLD TABLE AS removed FOR EACH STATEMENT
    EXECUTE FUNCTION herald_count_subscription_removals();
