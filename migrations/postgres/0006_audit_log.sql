-- One row for every mutation. The application may insert and read its own
-- tenant's rows, never update or delete them.
-- (Migrations 0010-0019 are reserved for the saga tables.)

CREATE TABLE audit_log (
  audit_id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  tenant_id      text NOT NULL,
  actor          text NOT NULL,
  action         text NOT NULL,
  target         text NOT NULL,
  version_before bigint,
  version_after  bigint,
  trace_id       text,
  details        jsonb NOT NULL DEFAULT '{}',
  at             timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX audit_log_tenant_at ON audit_log (tenant_id, at);

ALTER TABLE audit_log ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_read ON audit_log FOR SELECT
  USING (tenant_id = current_setting('statefabric.tenant', true));
CREATE POLICY tenant_insert ON audit_log FOR INSERT
  WITH CHECK (tenant_id = current_setting('statefabric.tenant', true));

GRANT SELECT, INSERT ON audit_log TO statefabric_app_role;
