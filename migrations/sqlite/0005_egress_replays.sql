-- Recorded egress responses (see the Postgres migration 0025).
CREATE TABLE egress_replays (
  tenant_id   TEXT NOT NULL,
  replay_key  TEXT NOT NULL,
  fingerprint TEXT NOT NULL,
  status      INTEGER NOT NULL,
  headers     TEXT NOT NULL,
  body        BLOB NOT NULL,
  expires_at  INTEGER NOT NULL,
  PRIMARY KEY (tenant_id, replay_key)
);
