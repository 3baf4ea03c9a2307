-- statefabric_saga_commit (0016) again, with the Kafka transport: when the
-- transition says `outbox`, every task it dispatches is also written to the
-- transactional outbox (aggregate type `saga.command`, keyed by saga id), in
-- the same transaction, for the relay to publish. Global position 0: saga
-- commands are not events of the event store; the relay orders them by
-- commit like everything else.

CREATE OR REPLACE FUNCTION statefabric_saga_commit(p_lease text, p_epoch bigint, t jsonb)
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER SET search_path = public AS $$
DECLARE
  v_saga   text := t->>'saga_id';
  v_tenant text := t->>'tenant_id';
  v_rev    bigint;
  n        integer;
BEGIN
  IF p_lease IS NOT NULL THEN
    PERFORM statefabric_check_epoch(p_lease, p_epoch);
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

  IF jsonb_typeof(t->'expected') IS DISTINCT FROM 'number' THEN
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
     WHERE saga_id = v_saga AND revision = (t->>'expected')::bigint
    RETURNING revision INTO v_rev;
    IF v_rev IS NULL THEN
      RAISE EXCEPTION 'saga % changed concurrently', v_saga USING ERRCODE = 'SF002';
    END IF;
  END IF;

  IF jsonb_typeof(t->'finish') = 'object' THEN
    UPDATE saga_tasks
       SET status = t->'finish'->>'status', output = t->'finish'->'output',
           error = t->'finish'->>'error', finished_at = now()
     WHERE task_key = t->'finish'->>'key' AND status = 'dispatched';
  END IF;

  IF jsonb_array_length(t->'cancel') > 0 THEN
    DELETE FROM saga_timers
     WHERE task_key IN (SELECT jsonb_array_elements_text(t->'cancel'));
    UPDATE saga_tasks SET status = 'cancelled', finished_at = now()
     WHERE task_key IN (SELECT jsonb_array_elements_text(t->'cancel')) AND status = 'dispatched';
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

  -- With the Kafka transport, each new task also goes through the outbox:
  -- the relay publishes it to the tenant's command topic for its agent type.
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
