-- Fencing: the highest lock token each guarded resource has seen. A write
-- that carries a lock's fencing token advances the row, or is refused when a
-- newer token was already used: a holder whose lease lapsed (paused, cut
-- off) cannot write after the lock's next holder has.

CREATE TABLE fences (
  tenant_id text NOT NULL,
  lock_name text NOT NULL,
  token     bigint NOT NULL CHECK (token >= 1),
  PRIMARY KEY (tenant_id, lock_name)
);

ALTER TABLE fences ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON fences
  USING (tenant_id = current_setting('statefabric.tenant', true))
  WITH CHECK (tenant_id = current_setting('statefabric.tenant', true));

GRANT SELECT, INSERT, UPDATE ON fences TO statefabric_app_role;
