-- A task command written to the outbox (the Kafka transport) carries the
-- saga's trace context in its headers — `traceparent`, from the instance's
-- state — so the relay puts it on the Kafka message and the agent's sidecar
-- hands it to the task: one saga, one trace, over Kafka as over the tables.
-- The function is 0020's, with that one change.

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
           jsonb_strip_nulls(jsonb_build_object('tenant', v_tenant, 'saga_id', v_saga,
                                                'traceparent', t->'state'->>'traceparent')),
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
