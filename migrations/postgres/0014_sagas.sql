-- Sagas: instances, step executions (tasks), durable timers, the inbox of
-- replies and start requests, the full history, and the definitions every
-- instance was started on.
--
-- Who writes what:
-- - the saga engine (the control plane's leader, a member of
--   statefabric_saga_engine_role) owns instances, tasks, timers and history
--   for every tenant; each of its transitions is one transaction that first
--   checks its leader epoch (statefabric_check_epoch);
-- - sidecars (statefabric_app_role, one tenant each under Row-Level
--   Security) claim their agent type's tasks, push a task's deadline with a
--   heartbeat, and insert replies and start requests into the inbox. They
--   never change an instance: the engine does, from the inbox, and deletes
--   the inbox row in the same transaction (a reply has one effect).

DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'statefabric_saga_engine_role') THEN
    CREATE ROLE statefabric_saga_engine_role NOLOGIN NOBYPASSRLS;
  END IF;
END $$;

CREATE TABLE saga_definitions (
  name        text NOT NULL,
  version     integer NOT NULL CHECK (version >= 1),
  body        jsonb NOT NULL,
  created_at  timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (name, version)
);

CREATE TABLE saga_instances (
  saga_id       text PRIMARY KEY,
  tenant_id     text NOT NULL,
  definition    text NOT NULL,
  version       integer NOT NULL,
  status        text NOT NULL,
  paused        boolean NOT NULL DEFAULT false,
  state         jsonb NOT NULL,
  revision      bigint NOT NULL,
  started_at    timestamptz NOT NULL DEFAULT now(),
  updated_at    timestamptz NOT NULL DEFAULT now(),
  -- The last transition that moved the saga forward (stuck detection).
  progressed_at timestamptz NOT NULL DEFAULT now(),
  ended_at      timestamptz
);
CREATE INDEX saga_instances_open ON saga_instances (status, progressed_at) WHERE ended_at IS NULL;
CREATE INDEX saga_instances_definition ON saga_instances (definition, started_at);

-- One row per attempt of a step or of its compensation.
CREATE TABLE saga_tasks (
  task_key      text PRIMARY KEY,
  saga_id       text NOT NULL REFERENCES saga_instances (saga_id) ON DELETE CASCADE,
  tenant_id     text NOT NULL,
  step          text NOT NULL,
  visit         integer NOT NULL,
  attempt       integer NOT NULL,
  compensation  boolean NOT NULL,
  agent         text NOT NULL,
  action        text NOT NULL,
  input         jsonb NOT NULL,
  timeout_ms    bigint NOT NULL,
  status        text NOT NULL,
  claimed_by    text,
  dispatched_at timestamptz NOT NULL DEFAULT now(),
  claimed_at    timestamptz,
  finished_at   timestamptz,
  output        jsonb,
  error         text
);
CREATE INDEX saga_tasks_open ON saga_tasks (tenant_id, agent, dispatched_at)
  WHERE status = 'dispatched' AND claimed_by IS NULL;
CREATE INDEX saga_tasks_saga ON saga_tasks (saga_id);

-- Deadlines (a task's lease) and retry delays; they survive restarts.
CREATE TABLE saga_timers (
  saga_id   text NOT NULL REFERENCES saga_instances (saga_id) ON DELETE CASCADE,
  tenant_id text NOT NULL,
  task_key  text NOT NULL,
  kind      text NOT NULL CHECK (kind IN ('deadline', 'retry')),
  fire_at   timestamptz NOT NULL,
  PRIMARY KEY (task_key, kind)
);
CREATE INDEX saga_timers_due ON saga_timers (fire_at);

CREATE TABLE saga_inbox (
  inbox_id  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  tenant_id text NOT NULL,
  saga_id   text NOT NULL,
  -- start | completed | failed
  kind      text NOT NULL CHECK (kind IN ('start', 'completed', 'failed')),
  task_key  text,
  body      jsonb NOT NULL,
  sender    text NOT NULL,
  at        timestamptz NOT NULL DEFAULT now()
);
-- One reply per attempt waits at a time: a repeat is recognised at once.
CREATE UNIQUE INDEX saga_inbox_one_reply ON saga_inbox (task_key) WHERE task_key IS NOT NULL;
CREATE UNIQUE INDEX saga_inbox_one_start ON saga_inbox (saga_id) WHERE kind = 'start';

CREATE TABLE saga_history (
  saga_id   text NOT NULL REFERENCES saga_instances (saga_id) ON DELETE CASCADE,
  revision  bigint NOT NULL,
  idx       integer NOT NULL,
  tenant_id text NOT NULL,
  at        timestamptz NOT NULL DEFAULT now(),
  kind      text NOT NULL,
  actor     text,
  epoch     bigint,
  detail    jsonb NOT NULL,
  PRIMARY KEY (saga_id, revision, idx)
);

-- A tenant's own rows, or every row for the engine. The role test is a
-- sub-select so it runs once per statement, not once per row.
DO $$
DECLARE t text;
BEGIN
  FOREACH t IN ARRAY ARRAY['saga_instances', 'saga_tasks', 'saga_timers', 'saga_inbox', 'saga_history'] LOOP
    EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
    EXECUTE format($p$CREATE POLICY tenant_or_engine ON %I
      USING (tenant_id = current_setting('statefabric.tenant', true)
             OR (SELECT pg_has_role(current_user, 'statefabric_saga_engine_role', 'MEMBER')))
      WITH CHECK (tenant_id = current_setting('statefabric.tenant', true)
             OR (SELECT pg_has_role(current_user, 'statefabric_saga_engine_role', 'MEMBER')))$p$, t);
  END LOOP;
END $$;

-- Wakes the engine when the inbox gets a row, and the sidecars of an agent
-- type when it gets a task (payload: tenant/agent).
CREATE FUNCTION saga_inbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('statefabric_saga_inbox', '');
  RETURN NULL;
END $$;
CREATE TRIGGER saga_inbox_notify AFTER INSERT ON saga_inbox
  FOR EACH STATEMENT EXECUTE FUNCTION saga_inbox_notify();

CREATE FUNCTION saga_tasks_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('statefabric_saga_tasks', t.v)
     FROM (SELECT DISTINCT tenant_id || '/' || agent AS v FROM new_tasks) t;
  RETURN NULL;
END $$;
CREATE TRIGGER saga_tasks_notify AFTER INSERT ON saga_tasks
  REFERENCING NEW TABLE AS new_tasks
  FOR EACH STATEMENT EXECUTE FUNCTION saga_tasks_notify();

GRANT SELECT, INSERT ON saga_definitions TO statefabric_saga_engine_role;
GRANT SELECT, INSERT, UPDATE, DELETE ON saga_instances, saga_tasks, saga_timers, saga_inbox, saga_history
  TO statefabric_saga_engine_role;
GRANT SELECT ON saga_definitions, saga_instances, saga_history TO statefabric_app_role;
GRANT SELECT ON saga_tasks TO statefabric_app_role;
GRANT UPDATE (claimed_by, claimed_at) ON saga_tasks TO statefabric_app_role;
GRANT SELECT ON saga_timers TO statefabric_app_role;
GRANT UPDATE (fire_at) ON saga_timers TO statefabric_app_role;
GRANT SELECT, INSERT ON saga_inbox TO statefabric_app_role;

-- One transition in one round trip and one transaction: the fence, the
-- trigger (an inbox row or a timer that must still be due; -1 when it is
-- gone and nothing is written), the instance (insert with revision 1, -2
-- when the id exists; or update at the expected revision, SF002 when
-- another write came first), the answered attempt, cancelled attempts, new
-- tasks and timers, and the history lines. `t` is built by the engine
-- (crates/saga-engine/src/store/pg.rs).
CREATE FUNCTION statefabric_saga_commit(p_lease text, p_epoch bigint, t jsonb)
RETURNS bigint LANGUAGE plpgsql AS $$
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

  INSERT INTO saga_tasks (task_key, saga_id, tenant_id, step, visit, attempt, compensation,
                          agent, action, input, timeout_ms, status)
  SELECT d.task_key, v_saga, v_tenant, d.step, d.visit, d.attempt, d.compensation,
         d.agent, d.action, d.input, d.timeout_ms, 'dispatched'
    FROM jsonb_to_recordset(t->'dispatch') AS d(task_key text, step text, visit integer,
         attempt integer, compensation boolean, agent text, action text, input jsonb,
         timeout_ms bigint)
  ON CONFLICT (task_key) DO NOTHING;

  INSERT INTO saga_timers (saga_id, tenant_id, task_key, kind, fire_at)
  SELECT v_saga, v_tenant, x.task_key, x.kind, now() + x.after_ms * interval '1 millisecond'
    FROM jsonb_to_recordset(t->'timers') AS x(task_key text, kind text, after_ms bigint)
  ON CONFLICT (task_key, kind) DO UPDATE SET fire_at = EXCLUDED.fire_at;

  INSERT INTO saga_history (saga_id, revision, idx, tenant_id, kind, actor, epoch, detail)
  SELECT v_saga, v_rev, (h.ord - 1)::integer, v_tenant, h.value->>'kind', h.value->>'actor',
         p_epoch, h.value->'detail'
    FROM jsonb_array_elements(t->'history') WITH ORDINALITY AS h(value, ord);
  RETURN v_rev;
END;
$$;

-- Drops an inbox row the engine cannot apply, under the same fence.
CREATE FUNCTION statefabric_saga_discard(p_lease text, p_epoch bigint, p_inbox_id bigint)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
  IF p_lease IS NOT NULL THEN
    PERFORM statefabric_check_epoch(p_lease, p_epoch);
  END IF;
  DELETE FROM saga_inbox WHERE inbox_id = p_inbox_id;
END;
$$;

REVOKE ALL ON FUNCTION statefabric_saga_commit(text, bigint, jsonb),
                       statefabric_saga_discard(text, bigint, bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION statefabric_saga_commit(text, bigint, jsonb),
                          statefabric_saga_discard(text, bigint, bigint) TO statefabric_saga_engine_role;
