-- Idempotency keys: the first execution of a keyed command stores its result
-- in the same transaction as its effects; a repeat returns the stored result.
-- A concurrent duplicate blocks on the first one's uncommitted row and then
-- sees its result, so it never executes twice.

CREATE TABLE idempotency_keys (
  tenant_id       text NOT NULL,
  idempotency_key text NOT NULL CHECK (length(idempotency_key) BETWEEN 1 AND 256),
  request_hash    text NOT NULL,
  status          text NOT NULL CHECK (status IN ('in_progress', 'completed')),
  response        jsonb,
  created_at      timestamptz NOT NULL DEFAULT now(),
  expires_at      timestamptz NOT NULL,
  PRIMARY KEY (tenant_id, idempotency_key)
);
CREATE INDEX idempotency_keys_expiry ON idempotency_keys (expires_at);

ALTER TABLE idempotency_keys ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON idempotency_keys
  USING (tenant_id = current_setting('statefabric.tenant', true))
  WITH CHECK (tenant_id = current_setting('statefabric.tenant', true));

GRANT SELECT, INSERT, UPDATE, DELETE ON idempotency_keys TO statefabric_app_role;

-- The periodic clean-up works across tenants, which the application role
-- cannot see; this function runs as its owner and does only that.
CREATE FUNCTION statefabric_purge_expired_idempotency_keys() RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
DECLARE
  purged bigint;
BEGIN
  DELETE FROM public.idempotency_keys WHERE expires_at < now();
  GET DIAGNOSTICS purged = ROW_COUNT;
  RETURN purged;
END
$$;
REVOKE ALL ON FUNCTION statefabric_purge_expired_idempotency_keys() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION statefabric_purge_expired_idempotency_keys() TO statefabric_app_role;
