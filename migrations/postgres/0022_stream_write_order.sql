-- Each stream remembers the transaction id of its last writer, and an append
-- is refused when that id is above the appender's own.
--
-- The commit-ordered feed and the outbox relay read in transaction-id order
-- (below the oldest running transaction). A transaction's id is taken at
-- its first write, not at the stream row's lock. So a transaction that
-- wrote something first (an idempotency key, a fence, a caller's own row in
-- `append_in`) and then waited can hold a smaller id than a transaction that
-- appended to the same stream and committed meanwhile; it would then append
-- the next version with the smaller id, and both readers would deliver the
-- stream's events out of order (version 6 before version 5). The append now
-- matches no row in that case; the store says why (`WriteOrder`), and
-- `EventStore::append` runs the transaction again, with a new, larger id.
-- Without an earlier write the id is taken at the stream statement itself,
-- after the last writer committed, so the check costs nothing but a
-- comparison. Rows from before this migration have no last writer.

ALTER TABLE streams ADD COLUMN last_transaction_id xid8;
