-- Herald schema 12 (PostgreSQL): the store's epoch, so that a history the database lost (a failover
-- to an asynchronous standby, a point-in-time restore) never hands out a position twice
-- (store/postgres/epoch.py, docs/storage.md "The store's epoch").

-- The history the data was last written under: the cluster's system identifier and the timeline
-- (a promotion or a PITR restore starts a new timeline, a restore from pg_dump a new cluster or
-- database).
-- One row, written at the first open and whenever a connection finds the epoch changed.
CREATE TABLE store_epoch (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    system_identifier bigint NOT NULL,
    database_oid bigint NOT NULL,
    timeline bigint NOT NULL,
    changed timestamptz NOT NULL,
    moves integer NOT NULL  -- how many new histories were found (each skipped positions)
);

-- Per user, the positions skipped when the epoch changed: `after` < position < `before` was
-- never issued on this history, so a device holding one holds a change that was lost (410).
CREATE TABLE feed_voids (
    user_id text COLLATE "C" NOT NULL,
    after bigint NOT NULL,
    before bigint NOT NULL,
    PRIMARY KEY (user_id, after)
);

-- The same for the app feed's seqs (store/postgres/changefeed.py): after < seq < before.
CREATE TABLE app_feed_voids (
    after bigint PRIMARY KEY,
    before bigint NOT NULL
);
