-- The latest snapshot of each stream: the state at a stream version, so
-- loading reads the snapshot plus only the events after it.

CREATE TABLE snapshots (
  tenant_id            text NOT NULL,
  stream_id            text NOT NULL,
  stream_type          text NOT NULL,
  stream_version       bigint NOT NULL CHECK (stream_version >= 1),
  state                jsonb NOT NULL,
  state_schema_version integer NOT NULL CHECK (state_schema_version >= 1),
  created_at           timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (tenant_id, stream_id)
);

ALTER TABLE snapshots ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON snapshots
  USING (tenant_id = current_setting('statefabric.tenant', true))
  WITH CHECK (tenant_id = current_setting('statefabric.tenant', true));

GRANT SELECT, INSERT, UPDATE ON snapshots TO statefabric_app_role;
