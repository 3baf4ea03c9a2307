-- The relay reads after a cursor: the (transaction id, position) of the
-- last row it sent. Rows below the oldest running transaction never gain a
-- predecessor (a transaction's rows all appear at its commit, and any
-- transaction still running has an id at or above that horizon), so a
-- batch after the cursor is exactly what follows the last one sent. The
-- relay can then delete sent rows in the background instead of waiting for
-- the delete before reading the next batch. A null cursor starts at the
-- front, as statefabric_relay_batch does.
CREATE FUNCTION statefabric_relay_batch_after(p_limit integer, p_after_tx text, p_after_pos bigint)
RETURNS TABLE (id uuid, tenant_id text, aggregatetype text, aggregateid text, type text,
               payload jsonb, headers jsonb, global_position bigint, commit_id text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public AS $$
  SELECT o.id, o.tenant_id, o.aggregatetype, o.aggregateid, o.type, o.payload, o.headers,
         o.global_position, o.transaction_id::text
    FROM event_outbox o
   WHERE o.transaction_id < pg_snapshot_xmin(pg_current_snapshot())
     AND (p_after_tx IS NULL
          OR (o.transaction_id, o.global_position) > (p_after_tx::xid8, p_after_pos))
   ORDER BY o.transaction_id, o.global_position
   LIMIT p_limit;
$$;

REVOKE ALL ON FUNCTION statefabric_relay_batch_after(integer, text, bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION statefabric_relay_batch_after(integer, text, bigint)
  TO statefabric_relay_role;
