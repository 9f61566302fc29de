-- Herald schema 13 (PostgreSQL): no table changes. The function herald_lease
-- (store/postgres/functions/herald_lease.sql) is new: a node's lease renewal in one statement
-- instead of a transaction of several, which a node frozen in the middle of it left open. A new
-- schema version so that a Herald that knows it is not put back by an older one (docs/storage.md).
SELECT 1;
