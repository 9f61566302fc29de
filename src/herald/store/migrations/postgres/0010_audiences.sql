-- Herald schema 10 (PostgreSQL): audiences and sends to many users (docs/api.md "Audiences").

-- A named set of users an app maintains.
CREATE TABLE audiences (
    app text NOT NULL,
    id text NOT NULL,
    display_name text,
    created timestamptz NOT NULL,
    PRIMARY KEY (app, id)
);

CREATE TABLE audience_members (
    app text NOT NULL,
    audience text NOT NULL,
    user_id text NOT NULL,
    PRIMARY KEY (app, audience, user_id)
);

-- One request to reach many users: its content, its recipients (a snapshot) and how far the
-- runner has got. `idempotency_key` is unique per app while the operation is kept. A send is
-- run by the node holding the dispatch shard of its id (hashtextextended(id, 0) & 63).
CREATE TABLE sends (
    id text PRIMARY KEY,
    app text NOT NULL,
    idempotency_key text,
    fingerprint text NOT NULL,
    audience text,
    content bytea NOT NULL,
    total integer NOT NULL,
    done integer NOT NULL DEFAULT 0,
    failed integer NOT NULL DEFAULT 0,
    status text NOT NULL,
    created timestamptz NOT NULL,
    last_action timestamptz NOT NULL,
    finished timestamptz
);
CREATE UNIQUE INDEX sends_key ON sends (app, idempotency_key);
CREATE INDEX sends_unfinished ON sends (created) WHERE finished IS NULL;

CREATE TABLE send_recipients (
    send_id text NOT NULL,
    seq integer NOT NULL,
    user_id text NOT NULL,
    PRIMARY KEY (send_id, seq)
);

CREATE TABLE send_failures (
    send_id text NOT NULL,
    user_id text NOT NULL,
    code text NOT NULL,
    message text NOT NULL,
    PRIMARY KEY (send_id, user_id)
);
