-- Tenants, and the role every application login is granted.
--
-- Tenancy: the application connects as a role that does not own these tables
-- (so Row-Level Security applies to it), and names its tenant per transaction
-- with set_config('statefabric.tenant', <id>, true) (a SET LOCAL). Every
-- tenant table's policy compares against that setting; with it unset, no row
-- is visible or writable.
--
-- Application logins are made members of statefabric_app_role:
--   GRANT statefabric_app_role TO <login>;

DO $$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'statefabric_app_role') THEN
    CREATE ROLE statefabric_app_role NOLOGIN NOBYPASSRLS;
  END IF;
END
$$;

CREATE TABLE tenants (
  tenant_id    text PRIMARY KEY CHECK (tenant_id ~ '^[a-z0-9_-]{1,64}$'),
  display_name text NOT NULL DEFAULT '',
  created_at   timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE tenants ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON tenants
  USING (tenant_id = current_setting('statefabric.tenant', true));
GRANT SELECT ON tenants TO statefabric_app_role;
