-- The relay's read (migration 0019) as PL/pgSQL. A SQL function that runs
-- as its owner (SECURITY DEFINER, its own search_path) is never inlined, so
-- Postgres parsed and planned its query again on every call: about 0.5 ms
-- of a backend per read even with an empty outbox, and the relay reads
-- continuously. PL/pgSQL keeps the parsed statements for the session.
-- Each call is still planned with its actual cursor and the table's current
-- size (force_custom_plan): a plan cached while the outbox was empty would
-- scan and sort the whole table once a backlog builds, where the commit-
-- order index reads just the front. The cursor comparison is written
-- without `IS NULL OR`, so it is an index condition rather than a filter.
-- Same signature, result and grants as before.
CREATE OR REPLACE FUNCTION statefabric_relay_batch_after(p_limit integer, p_after_tx text, p_after_pos bigint)
RETURNS TABLE (id uuid, tenant_id text, aggregatetype text, aggregateid text, type text,
               payload jsonb, headers jsonb, global_position bigint, commit_id text)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = public SET plan_cache_mode = force_custom_plan AS $$
BEGIN
  IF p_after_tx IS NULL THEN
    RETURN QUERY
      SELECT o.id, o.tenant_id, o.aggregatetype, o.aggregateid, o.type, o.payload, o.headers,
             o.global_position, o.transaction_id::text
        FROM event_outbox o
       WHERE o.transaction_id < pg_snapshot_xmin(pg_current_snapshot())
       ORDER BY o.transaction_id, o.global_position
       LIMIT p_limit;
  ELSE
    RETURN QUERY
      SELECT o.id, o.tenant_id, o.aggregatetype, o.aggregateid, o.type, o.payload, o.headers,
             o.global_position, o.transaction_id::text
        FROM event_outbox o
       WHERE o.transaction_id < pg_snapshot_xmin(pg_current_snapshot())
         AND (o.transaction_id, o.global_position) > (p_after_tx::xid8, p_after_pos)
       ORDER BY o.transaction_id, o.global_position
       LIMIT p_limit;
  END IF;
END;
$$;
