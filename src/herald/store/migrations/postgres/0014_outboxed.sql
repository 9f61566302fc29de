-- Herald schema 14 (PostgreSQL): no table changes. herald_put_batch
-- (store/postgres/functions/herald_put_batch.sql) also answers each put's position, outbox seq,
-- whether it has a push target and whether it was its user's first entry left in the outbox, so
-- the dispatcher can publish a post's change at commit without reading it back (when its new
-- argument p_entries asks). Its arguments and result changed, so the old one is dropped first
-- (docs/storage.md). herald_entry_state
-- (store/postgres/functions/herald_entry_state.sql), which it calls for that, is new.
DROP FUNCTION IF EXISTS herald_put_batch(text[], text[], text[], text[], text[], text[], text[],
    timestamptz[], timestamptz[], bytea[], text[]);
