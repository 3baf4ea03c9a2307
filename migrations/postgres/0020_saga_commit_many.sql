-- Many saga transitions in one transaction. The engine computes a pass's
-- transitions in memory and commits them in batches: one round trip, one
-- epoch check and one WAL flush for dozens of transitions instead of one
-- each — on a small machine the per-transaction cost, not the rows, bounds
-- how many sagas advance per second.
--
-- statefabric_saga_apply holds the body of a transition (0018) with one
-- change: the saga's revision is checked, and its row locked, before
-- anything is written, so a transition that conflicts returns -3 having
-- changed nothing and the rest of its batch still commits (no exception,
-- hence no subtransaction per transition). Results: the new revision, -1
-- the trigger is gone, -2 the new saga exists, -3 the saga changed
-- concurrently.
--
-- Every statement of a transition reaches its rows by key, and the
-- functions run with sequential scans off: PL/pgSQL keeps one plan per
-- statement, made when a table may be nearly empty (the timers and the
-- inbox empty out whenever the fleet is idle), and a sequential scan
-- planned then is kept as the table grows — under load the deadline
-- timers' delete scanned the whole table each time and took half of each
-- batch's time.

CREATE OR REPLACE FUNCTION statefabric_saga_apply(p_epoch bigint, t jsonb)
RETURNS bigint LANGUAGE plpgsql SET search_path = public AS $$
DECLARE
  v_saga   text := t->>'saga_id';
  v_tenant text := t->>'tenant_id';
  v_new    boolean := jsonb_typeof(t->'expected') IS DISTINCT FROM 'number';
  v_rev    bigint;
  n        integer;
BEGIN
  IF NOT v_new THEN
    SELECT revision INTO v_rev FROM saga_instances WHERE saga_id = v_saga FOR NO KEY UPDATE;
    IF v_rev IS DISTINCT FROM (t->>'expected')::bigint THEN RETURN -3; END IF;
  END IF;

  IF t->>'trigger' = 'inbox' THEN
    DELETE FROM saga_inbox WHERE inbox_id = (t->>'inbox_id')::bigint;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n = 0 THEN RETURN -1; END IF;
  ELSIF t->>'trigger' = 'timer' THEN
    DELETE FROM saga_timers
     WHERE task_key = t->>'timer_key' AND kind = t->>'timer_kind' AND fire_at <= now();
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n = 0 THEN RETURN -1; END IF;
  END IF;

  IF v_new THEN
    INSERT INTO saga_instances (saga_id, tenant_id, definition, version, status, paused, state, revision)
    VALUES (v_saga, v_tenant, t->>'definition', (t->>'version')::integer, t->>'status',
            (t->>'paused')::boolean, t->'state', 1)
    ON CONFLICT (saga_id) DO NOTHING;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n = 0 THEN RETURN -2; END IF;
    v_rev := 1;
  ELSE
    UPDATE saga_instances
       SET status = t->>'status',
           paused = (t->>'paused')::boolean,
           state = t->'state',
           revision = revision + 1,
           updated_at = now(),
           progressed_at = CASE WHEN (t->>'progressed')::boolean THEN now() ELSE progressed_at END,
           ended_at = CASE WHEN (t->>'final')::boolean THEN coalesce(ended_at, now()) ELSE NULL END
     WHERE saga_id = v_saga
    RETURNING revision INTO v_rev;
  END IF;

  IF jsonb_typeof(t->'finish') = 'object' THEN
    UPDATE saga_tasks
       SET status = t->'finish'->>'status', output = t->'finish'->'output',
           error = t->'finish'->>'error', finished_at = now()
     WHERE task_key = t->'finish'->>'key' AND status = 'dispatched';
  END IF;

  IF jsonb_array_length(t->'cancel') > 0 THEN
    DELETE FROM saga_timers
     WHERE task_key = ANY (ARRAY(SELECT jsonb_array_elements_text(t->'cancel')));
    UPDATE saga_tasks SET status = 'cancelled', finished_at = now()
     WHERE task_key = ANY (ARRAY(SELECT jsonb_array_elements_text(t->'cancel')))
       AND status = 'dispatched';
  END IF;

  IF jsonb_array_length(t->'dispatch') > 0 THEN
  INSERT INTO saga_tasks (task_key, saga_id, tenant_id, step, visit, attempt, compensation,
                          agent, action, input, timeout_ms, status)
  SELECT d.task_key, v_saga, v_tenant, d.step, d.visit, d.attempt, d.compensation,
         d.agent, d.action, d.input, d.timeout_ms, 'dispatched'
    FROM jsonb_to_recordset(t->'dispatch') AS d(task_key text, step text, visit integer,
         attempt integer, compensation boolean, agent text, action text, input jsonb,
         timeout_ms bigint)
  ON CONFLICT (task_key) DO NOTHING;
  END IF;

  IF jsonb_array_length(t->'timers') > 0 THEN
  INSERT INTO saga_timers (saga_id, tenant_id, task_key, kind, fire_at)
  SELECT v_saga, v_tenant, x.task_key, x.kind, now() + x.after_ms * interval '1 millisecond'
    FROM jsonb_to_recordset(t->'timers') AS x(task_key text, kind text, after_ms bigint)
  ON CONFLICT (task_key, kind) DO UPDATE SET fire_at = EXCLUDED.fire_at;
  END IF;

  IF coalesce((t->>'outbox')::boolean, false) AND jsonb_array_length(t->'dispatch') > 0 THEN
    INSERT INTO event_outbox (id, tenant_id, aggregatetype, aggregateid, type, payload, headers,
                              global_position)
    SELECT gen_random_uuid(), v_tenant, 'saga.command', v_saga, 'SagaCommand',
           jsonb_build_object(
             'task_key', d->>'task_key', 'step', d->>'step',
             'visit', (d->>'visit')::integer, 'attempt', (d->>'attempt')::integer,
             'compensation', (d->>'compensation')::boolean, 'agent_type', d->>'agent',
             'action', d->>'action', 'input', d->'input',
             'timeout_ms', (d->>'timeout_ms')::bigint,
             'issued_at', now(), 'created_at', now()),
           jsonb_build_object('tenant', v_tenant, 'saga_id', v_saga),
           0
      FROM jsonb_array_elements(t->'dispatch') AS d;
  END IF;

  INSERT INTO saga_history (saga_id, revision, idx, tenant_id, kind, actor, epoch, detail)
  SELECT v_saga, v_rev, (h.ord - 1)::integer, v_tenant, h.value->>'kind', h.value->>'actor',
         p_epoch, h.value->'detail'
    FROM jsonb_array_elements(t->'history') WITH ORDINALITY AS h(value, ord);
  RETURN v_rev;
END;
$$;

-- One transition, as before: a conflict is an error (SF002).
CREATE OR REPLACE FUNCTION statefabric_saga_commit(p_lease text, p_epoch bigint, t jsonb)
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER
SET search_path = public SET enable_seqscan = off AS $$
DECLARE
  v_rev bigint;
BEGIN
  IF p_lease IS NOT NULL THEN
    PERFORM statefabric_check_epoch(p_lease, p_epoch);
  END IF;
  v_rev := statefabric_saga_apply(p_epoch, t);
  IF v_rev = -3 THEN
    RAISE EXCEPTION 'saga % changed concurrently', t->>'saga_id' USING ERRCODE = 'SF002';
  END IF;
  RETURN v_rev;
END;
$$;

-- Many transitions, in order, one result each; the epoch is checked once.
CREATE OR REPLACE FUNCTION statefabric_saga_commit_many(p_lease text, p_epoch bigint, ts jsonb)
RETURNS bigint[] LANGUAGE plpgsql SECURITY DEFINER
SET search_path = public SET enable_seqscan = off AS $$
DECLARE
  t       jsonb;
  results bigint[] := '{}';
BEGIN
  IF p_lease IS NOT NULL THEN
    PERFORM statefabric_check_epoch(p_lease, p_epoch);
  END IF;
  FOR t IN SELECT value FROM jsonb_array_elements(ts) LOOP
    results := results || statefabric_saga_apply(p_epoch, t);
  END LOOP;
  RETURN results;
END;
$$;

REVOKE ALL ON FUNCTION statefabric_saga_apply(bigint, jsonb),
                       statefabric_saga_commit_many(text, bigint, jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION statefabric_saga_commit_many(text, bigint, jsonb)
  TO statefabric_saga_engine_role;

-- A tenant's sagas (the operator list's tenant filter, and whoever waits
-- for a tenant's sagas to end) without scanning every tenant's. Neither
-- column changes after the insert, so transitions stay HOT updates.
CREATE INDEX saga_instances_tenant ON saga_instances (tenant_id, started_at);
