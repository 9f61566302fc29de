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
