-- Context changes are announced by their writer after the commit (the
-- store's announcer, crates/store/src/pg/announce.rs), no longer by a
-- trigger inside the writing transaction. A NOTIFY in a transaction that
-- writes makes Postgres serialize every such commit, WAL flush included
-- (the commit holds a database-wide lock from queueing the notification
-- until after its flush), so concurrent document writes could not share a
-- flush: measured with pgbench at 16 clients on an upsert of one row,
-- 731-763 commits/s with the trigger against 5,523-6,422 without it, and
-- 4,285-4,727 with the notification sent as a statement of its own after
-- the commit (which writes nothing, so flushes nothing).
--
-- The payload and channel are unchanged ("<tenant> <document> <revision>"
-- on statefabric_context). What changes: a writer that dies between its
-- commit and its announcement leaves other sidecars' cache entries stale
-- until their max_age (as with announcements over Redis), and a change
-- made by hand with SQL is not announced.

DROP TRIGGER IF EXISTS context_documents_notify ON context_documents;
DROP FUNCTION IF EXISTS context_documents_notify();
