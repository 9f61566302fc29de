-- Herald schema 11 (PostgreSQL): no table changes. The function herald_dispatched
-- (store/postgres/functions/herald_dispatched.sql) is new: the dispatcher's removal of outbox
-- entries and queueing of their pushes, one statement instead of a transaction of several. A
-- new schema version so that an older Herald, which would not call it, still opens this
-- database, and one that knows it is not put back by an older one (docs/storage.md).
SELECT 1;
