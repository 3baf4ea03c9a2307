-- Sagas in the embedded store (see the Postgres migration 0014 for the
-- model). Times are milliseconds since the epoch; one process owns the file,
-- so there is no row security and no leader epoch.

CREATE TABLE saga_definitions (
  name       TEXT NOT NULL,
  version    INTEGER NOT NULL CHECK (version >= 1),
  body       TEXT NOT NULL,
  created_at INTEGER NOT NULL,
  PRIMARY KEY (name, version)
);

CREATE TABLE saga_instances (
  saga_id       TEXT PRIMARY KEY,
  tenant_id     TEXT NOT NULL,
  definition    TEXT NOT NULL,
  version       INTEGER NOT NULL,
  status        TEXT NOT NULL,
  paused        INTEGER NOT NULL DEFAULT 0,
  state         TEXT NOT NULL,
  revision      INTEGER NOT NULL,
  started_at    INTEGER NOT NULL,
  updated_at    INTEGER NOT NULL,
  progressed_at INTEGER NOT NULL,
  ended_at      INTEGER
);
CREATE INDEX saga_instances_open ON saga_instances (status, progressed_at) WHERE ended_at IS NULL;
CREATE INDEX saga_instances_definition ON saga_instances (definition, started_at);

CREATE TABLE saga_tasks (
  task_key      TEXT PRIMARY KEY,
  saga_id       TEXT NOT NULL REFERENCES saga_instances (saga_id) ON DELETE CASCADE,
  tenant_id     TEXT NOT NULL,
  step          TEXT NOT NULL,
  visit         INTEGER NOT NULL,
  attempt       INTEGER NOT NULL,
  compensation  INTEGER NOT NULL,
  agent         TEXT NOT NULL,
  action        TEXT NOT NULL,
  input         TEXT NOT NULL,
  timeout_ms    INTEGER NOT NULL,
  status        TEXT NOT NULL,
  claimed_by    TEXT,
  dispatched_at INTEGER NOT NULL,
  claimed_at    INTEGER,
  finished_at   INTEGER,
  output        TEXT,
  error         TEXT
);
CREATE INDEX saga_tasks_open ON saga_tasks (tenant_id, agent, dispatched_at)
  WHERE status = 'dispatched' AND claimed_by IS NULL;
CREATE INDEX saga_tasks_saga ON saga_tasks (saga_id);

CREATE TABLE saga_timers (
  saga_id   TEXT NOT NULL REFERENCES saga_instances (saga_id) ON DELETE CASCADE,
  tenant_id TEXT NOT NULL,
  task_key  TEXT NOT NULL,
  kind      TEXT NOT NULL CHECK (kind IN ('deadline', 'retry')),
  fire_at   INTEGER NOT NULL,
  PRIMARY KEY (task_key, kind)
);
CREATE INDEX saga_timers_due ON saga_timers (fire_at);

CREATE TABLE saga_inbox (
  inbox_id  INTEGER PRIMARY KEY AUTOINCREMENT,
  tenant_id TEXT NOT NULL,
  saga_id   TEXT NOT NULL,
  kind      TEXT NOT NULL CHECK (kind IN ('start', 'completed', 'failed')),
  task_key  TEXT,
  body      TEXT NOT NULL,
  sender    TEXT NOT NULL,
  at        INTEGER NOT NULL
);
CREATE UNIQUE INDEX saga_inbox_one_reply ON saga_inbox (task_key) WHERE task_key IS NOT NULL;
CREATE UNIQUE INDEX saga_inbox_one_start ON saga_inbox (saga_id) WHERE kind = 'start';

CREATE TABLE saga_history (
  saga_id   TEXT NOT NULL REFERENCES saga_instances (saga_id) ON DELETE CASCADE,
  revision  INTEGER NOT NULL,
  idx       INTEGER NOT NULL,
  tenant_id TEXT NOT NULL,
  at        INTEGER NOT NULL,
  kind      TEXT NOT NULL,
  actor     TEXT,
  epoch     INTEGER,
  detail    TEXT NOT NULL,
  PRIMARY KEY (saga_id, revision, idx)
);
