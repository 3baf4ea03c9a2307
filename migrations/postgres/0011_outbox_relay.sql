-- The built-in outbox relay (control plane, leader only) reads and deletes
-- outbox rows of every tenant. It does so only through these two functions,
-- which run as their owner (the table owner, to whom Row-Level Security does
-- not apply) and are granted to statefabric_relay_role alone — never to the
-- sidecars' role.

DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'statefabric_relay_role') THEN
    CREATE ROLE statefabric_relay_role NOLOGIN NOBYPASSRLS;
  END IF;
END $$;

-- The oldest committed rows, in commit order, and only those below the
-- oldest transaction still running: a transaction that commits late (with a
-- smaller id than rows already visible) is never overtaken, so nothing is
-- skipped and order per aggregate holds. Sent rows are deleted, so each
-- batch starts again at the front.
CREATE FUNCTION statefabric_relay_batch(p_limit integer)
RETURNS TABLE (id uuid, tenant_id text, aggregatetype text, aggregateid text, type text,
               payload jsonb, headers jsonb, global_position bigint, commit_id text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public AS $$
  SELECT o.id, o.tenant_id, o.aggregatetype, o.aggregateid, o.type, o.payload, o.headers,
         o.global_position, o.transaction_id::text
    FROM event_outbox o
   WHERE o.transaction_id < pg_snapshot_xmin(pg_current_snapshot())
   ORDER BY o.transaction_id, o.global_position
   LIMIT p_limit;
$$;

-- Deletes what was sent, if the caller still leads (its epoch is checked in
-- this transaction): a relay that lost its lease cannot delete rows its
-- successor has not sent.
CREATE FUNCTION statefabric_relay_delete(p_ids uuid[], p_leader text, p_epoch bigint)
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER SET search_path = public AS $$
DECLARE
  n bigint;
BEGIN
  PERFORM statefabric_check_epoch(p_leader, p_epoch);
  DELETE FROM event_outbox WHERE id = ANY (p_ids);
  GET DIAGNOSTICS n = ROW_COUNT;
  RETURN n;
END;
$$;

REVOKE ALL ON FUNCTION statefabric_relay_batch(integer),
                       statefabric_relay_delete(uuid[], text, bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION statefabric_relay_batch(integer),
                          statefabric_relay_delete(uuid[], text, bigint) TO statefabric_relay_role;
