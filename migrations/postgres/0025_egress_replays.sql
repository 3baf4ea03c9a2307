-- Recorded upstream responses of the egress path, by the key the agent's
-- request carried (a saga task key or an Idempotency-Key): the same key and
-- request again is answered from here without calling the upstream; the
-- same key with another request is refused. Expire by time.

CREATE TABLE egress_replays (
  tenant_id   text NOT NULL,
  replay_key  text NOT NULL CHECK (length(replay_key) BETWEEN 1 AND 512),
  fingerprint text NOT NULL,
  status      integer NOT NULL CHECK (status BETWEEN 100 AND 599),
  headers     jsonb NOT NULL,
  body        bytea NOT NULL,
  created_at  timestamptz NOT NULL DEFAULT now(),
  expires_at  timestamptz NOT NULL,
  PRIMARY KEY (tenant_id, replay_key)
);
CREATE INDEX egress_replays_expiry ON egress_replays (expires_at);

ALTER TABLE egress_replays ENABLE ROW LEVEL SECURITY;
-- The session's tenant, and a login allowed to act for it (migration 0024).
CREATE POLICY tenant_isolation ON egress_replays
  USING (tenant_id = current_setting('statefabric.tenant', true)
         AND (SELECT statefabric_login_allows()))
  WITH CHECK (tenant_id = current_setting('statefabric.tenant', true)
         AND (SELECT statefabric_login_allows()));

GRANT SELECT, INSERT, DELETE ON egress_replays TO statefabric_app_role;
