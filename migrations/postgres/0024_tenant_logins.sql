-- Tenant-bound logins. Until now every sidecar connected as an application
-- login that could name any tenant with set_config('statefabric.tenant',
-- ...): a leaked credential reached every tenant. A tenant login is bound to
-- one tenant here, and every tenant policy also checks that the session's
-- login is not bound to another tenant, whatever the session sets — so a
-- leaked tenant credential reaches its own tenant's rows only. Logins not
-- listed (the relay's, the saga engine's, operators') are unchanged.
--
-- Onboarding makes a tenant's login with statefabric_create_tenant_login
-- (run by the schema owner, who needs CREATEROLE); the role name is derived
-- from the tenant id (role names are shorter than tenant ids may be).

CREATE TABLE tenant_logins (
  role_name name PRIMARY KEY,
  tenant_id text NOT NULL UNIQUE REFERENCES tenants (tenant_id) ON DELETE CASCADE
);
-- Read only through statefabric_login_allows (not granted to the app role).

-- Whether the session's login may act for the tenant the session names:
-- any login not bound to a tenant, or one bound to exactly that tenant.
-- Policies call it as a sub-select, so it runs once per statement.
CREATE FUNCTION statefabric_login_allows() RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public AS $$
  SELECT NOT EXISTS (
    SELECT 1 FROM tenant_logins l
    WHERE l.role_name = session_user
      AND l.tenant_id IS DISTINCT FROM current_setting('statefabric.tenant', true))
$$;
REVOKE ALL ON FUNCTION statefabric_login_allows() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION statefabric_login_allows() TO statefabric_app_role;

-- Every tenant policy: the session's tenant, and a login allowed to act
-- for it.
DO $$
DECLARE t text;
BEGIN
  FOREACH t IN ARRAY ARRAY['streams', 'event_store', 'event_outbox', 'snapshots',
                           'idempotency_keys', 'context_documents', 'context_revisions',
                           'fences'] LOOP
    EXECUTE format($p$ALTER POLICY tenant_isolation ON %I
      USING (tenant_id = current_setting('statefabric.tenant', true)
             AND (SELECT statefabric_login_allows()))
      WITH CHECK (tenant_id = current_setting('statefabric.tenant', true)
             AND (SELECT statefabric_login_allows()))$p$, t);
  END LOOP;
  FOREACH t IN ARRAY ARRAY['saga_instances', 'saga_tasks', 'saga_timers', 'saga_inbox', 'saga_history'] LOOP
    EXECUTE format($p$ALTER POLICY tenant_or_engine ON %I
      USING ((tenant_id = current_setting('statefabric.tenant', true)
              AND (SELECT statefabric_login_allows()))
             OR (SELECT pg_has_role(current_user, 'statefabric_saga_engine_role', 'MEMBER')))
      WITH CHECK ((tenant_id = current_setting('statefabric.tenant', true)
              AND (SELECT statefabric_login_allows()))
             OR (SELECT pg_has_role(current_user, 'statefabric_saga_engine_role', 'MEMBER')))$p$, t);
  END LOOP;
END $$;
ALTER POLICY tenant_isolation ON tenants
  USING (tenant_id = current_setting('statefabric.tenant', true)
         AND (SELECT statefabric_login_allows()));
ALTER POLICY tenant_read ON audit_log
  USING (tenant_id = current_setting('statefabric.tenant', true)
         AND (SELECT statefabric_login_allows()));
ALTER POLICY tenant_insert ON audit_log
  WITH CHECK (tenant_id = current_setting('statefabric.tenant', true)
              AND (SELECT statefabric_login_allows()));

-- Makes (or, given again, re-keys) the login of a tenant: a member of
-- statefabric_app_role and nothing else. Returns the role name.
CREATE FUNCTION statefabric_create_tenant_login(p_tenant text, p_password text) RETURNS name
LANGUAGE plpgsql AS $$
DECLARE
  v_role name := 'sft_' || left(encode(sha256(convert_to(p_tenant, 'UTF8')), 'hex'), 24);
BEGIN
  IF NOT EXISTS (SELECT 1 FROM tenants WHERE tenant_id = p_tenant) THEN
    RAISE EXCEPTION 'unknown tenant %', p_tenant USING ERRCODE = 'foreign_key_violation';
  END IF;
  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = v_role) THEN
    EXECUTE format('ALTER ROLE %I LOGIN PASSWORD %L', v_role, p_password);
  ELSE
    EXECUTE format('CREATE ROLE %I LOGIN NOBYPASSRLS PASSWORD %L IN ROLE statefabric_app_role',
                   v_role, p_password);
  END IF;
  INSERT INTO tenant_logins (role_name, tenant_id) VALUES (v_role, p_tenant)
  ON CONFLICT (role_name) DO NOTHING;
  RETURN v_role;
END $$;
REVOKE ALL ON FUNCTION statefabric_create_tenant_login(text, text) FROM PUBLIC;
