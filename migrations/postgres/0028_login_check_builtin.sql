-- The login check of every tenant policy (migration 0024) without a
-- function that reads a table. statefabric_login_allows() is SECURITY
-- DEFINER, so the planner never inlines it, and it reads tenant_logins
-- through a nested query: a write that touches the document, revision and
-- audit tables paid it once per table (measured with pgbench: the document
-- upsert alone 0.585 ms as a tenant's application login, 0.370 ms as the
-- table owner, who skips the policies).
--
-- A tenant login is now also a member of statefabric_tenant_login, and its
-- role name is derived from its tenant id (statefabric_tenant_role, the
-- derivation statefabric_create_tenant_login has always used). The check
-- becomes built-ins on the catalog cache: a login that is no tenant login,
-- or the login of the tenant the session names. Same rule as before; a
-- login whose tenant was deleted now reaches nothing (before, losing its
-- tenant_logins row unbound it).

DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'statefabric_tenant_login') THEN
    CREATE ROLE statefabric_tenant_login NOLOGIN NOBYPASSRLS;
  END IF;
END $$;

-- The login role of a tenant. IMMUTABLE SQL with a single expression, so
-- the planner inlines it into the policies.
CREATE FUNCTION statefabric_tenant_role(p_tenant text) RETURNS name
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT ('sft_' || left(encode(sha256(convert_to(p_tenant, 'UTF8')), 'hex'), 24))::name
$$;

-- Logins made before this migration join the marker role.
DO $$
DECLARE r name;
BEGIN
  FOR r IN SELECT l.role_name FROM tenant_logins l JOIN pg_roles p ON p.rolname = l.role_name LOOP
    EXECUTE format('GRANT statefabric_tenant_login TO %I', r);
  END LOOP;
END $$;

CREATE OR REPLACE FUNCTION statefabric_create_tenant_login(p_tenant text, p_password text) RETURNS name
LANGUAGE plpgsql AS $$
DECLARE
  v_role name := statefabric_tenant_role(p_tenant);
BEGIN
  IF NOT EXISTS (SELECT 1 FROM tenants WHERE tenant_id = p_tenant) THEN
    RAISE EXCEPTION 'unknown tenant %', p_tenant USING ERRCODE = 'foreign_key_violation';
  END IF;
  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = v_role) THEN
    EXECUTE format('ALTER ROLE %I LOGIN PASSWORD %L', v_role, p_password);
    EXECUTE format('GRANT statefabric_tenant_login TO %I', v_role);
  ELSE
    EXECUTE format('CREATE ROLE %I LOGIN NOBYPASSRLS PASSWORD %L IN ROLE statefabric_app_role, statefabric_tenant_login',
                   v_role, p_password);
  END IF;
  INSERT INTO tenant_logins (role_name, tenant_id) VALUES (v_role, p_tenant)
  ON CONFLICT (role_name) DO NOTHING;
  RETURN v_role;
END $$;
REVOKE ALL ON FUNCTION statefabric_create_tenant_login(text, text) FROM PUBLIC;

-- Every tenant policy: the session's tenant, and a login allowed to act for
-- it. The sub-select makes the check one evaluation per statement.
DO $$
DECLARE
  t text;
  allowed constant text := $c$(SELECT NOT pg_has_role(session_user, 'statefabric_tenant_login', 'MEMBER')
                OR session_user = statefabric_tenant_role(current_setting('statefabric.tenant', true)))$c$;
BEGIN
  FOREACH t IN ARRAY ARRAY['streams', 'event_store', 'event_outbox', 'snapshots',
                           'idempotency_keys', 'context_documents', 'context_revisions',
                           'fences', 'egress_replays'] LOOP
    EXECUTE format($p$ALTER POLICY tenant_isolation ON %I
      USING (tenant_id = current_setting('statefabric.tenant', true) AND %s)
      WITH CHECK (tenant_id = current_setting('statefabric.tenant', true) AND %s)$p$,
      t, allowed, allowed);
  END LOOP;
  FOREACH t IN ARRAY ARRAY['saga_instances', 'saga_tasks', 'saga_timers', 'saga_inbox', 'saga_history'] LOOP
    EXECUTE format($p$ALTER POLICY tenant_or_engine ON %I
      USING ((tenant_id = current_setting('statefabric.tenant', true) AND %s)
             OR (SELECT pg_has_role(current_user, 'statefabric_saga_engine_role', 'MEMBER')))
      WITH CHECK ((tenant_id = current_setting('statefabric.tenant', true) AND %s)
             OR (SELECT pg_has_role(current_user, 'statefabric_saga_engine_role', 'MEMBER')))$p$,
      t, allowed, allowed);
  END LOOP;
  EXECUTE format($p$ALTER POLICY tenant_isolation ON tenants
    USING (tenant_id = current_setting('statefabric.tenant', true) AND %s)$p$, allowed);
  EXECUTE format($p$ALTER POLICY tenant_read ON audit_log
    USING (tenant_id = current_setting('statefabric.tenant', true) AND %s)$p$, allowed);
  EXECUTE format($p$ALTER POLICY tenant_insert ON audit_log
    WITH CHECK (tenant_id = current_setting('statefabric.tenant', true) AND %s)$p$, allowed);
END $$;

DROP FUNCTION statefabric_login_allows();
