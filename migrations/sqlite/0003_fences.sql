-- Fencing tokens seen per lock (see the Postgres migration 0008).
CREATE TABLE fences (
  tenant_id TEXT NOT NULL,
  lock_name TEXT NOT NULL,
  token     INTEGER NOT NULL CHECK (token >= 1),
  PRIMARY KEY (tenant_id, lock_name)
);
