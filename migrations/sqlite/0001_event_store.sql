-- The embedded (SQLite) event store: the same tables as Postgres, in one file.
-- There is no Row-Level Security here: the adapter scopes every statement to
-- its tenant in code, and there is only one process. Immutability of events
-- and of the audit log is enforced by triggers instead of grants.
-- Timestamps are RFC 3339 text; idempotency expiry is Unix milliseconds.

CREATE TABLE tenants (
  tenant_id    TEXT PRIMARY KEY,
  display_name TEXT NOT NULL DEFAULT '',
  created_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

CREATE TABLE streams (
  tenant_id   TEXT NOT NULL REFERENCES tenants (tenant_id),
  stream_id   TEXT NOT NULL,
  stream_type TEXT NOT NULL,
  version     INTEGER NOT NULL CHECK (version >= 1),
  created_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
  updated_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
  PRIMARY KEY (tenant_id, stream_id)
);

-- Writers are serialized (one write connection), so positions commit in
-- order and the feed can follow global_position directly.
CREATE TABLE event_store (
  global_position      INTEGER PRIMARY KEY AUTOINCREMENT,
  event_id             TEXT NOT NULL UNIQUE,
  tenant_id            TEXT NOT NULL,
  stream_id            TEXT NOT NULL,
  stream_type          TEXT NOT NULL,
  event_type           TEXT NOT NULL,
  event_schema_version INTEGER NOT NULL CHECK (event_schema_version >= 1),
  data                 TEXT NOT NULL,
  metadata             TEXT NOT NULL DEFAULT '{}',
  stream_version       INTEGER NOT NULL CHECK (stream_version >= 1),
  created_at           TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
  UNIQUE (tenant_id, stream_id, stream_version)
);
CREATE INDEX event_store_tenant_position ON event_store (tenant_id, global_position);

CREATE TRIGGER event_store_immutable_update BEFORE UPDATE ON event_store
BEGIN SELECT RAISE(ABORT, 'events are immutable'); END;
CREATE TRIGGER event_store_immutable_delete BEFORE DELETE ON event_store
BEGIN SELECT RAISE(ABORT, 'events are immutable'); END;

CREATE TABLE event_outbox (
  id              TEXT PRIMARY KEY,
  tenant_id       TEXT NOT NULL,
  aggregatetype   TEXT NOT NULL,
  aggregateid     TEXT NOT NULL,
  type            TEXT NOT NULL,
  payload         TEXT NOT NULL,
  headers         TEXT NOT NULL DEFAULT '{}',
  global_position INTEGER NOT NULL,
  created_at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX event_outbox_position ON event_outbox (global_position);

CREATE TRIGGER event_store_outbox AFTER INSERT ON event_store
BEGIN
  INSERT INTO event_outbox (id, tenant_id, aggregatetype, aggregateid, type, payload, headers, global_position)
  VALUES (
    NEW.event_id, NEW.tenant_id, NEW.stream_type, NEW.stream_id, NEW.event_type,
    json_object(
      'id', NEW.event_id, 'tenant', NEW.tenant_id, 'stream_id', NEW.stream_id,
      'stream_type', NEW.stream_type, 'stream_version', NEW.stream_version,
      'event_type', NEW.event_type, 'schema_version', NEW.event_schema_version,
      'global_position', NEW.global_position, 'created_at', NEW.created_at,
      'data', json(NEW.data), 'metadata', json(NEW.metadata)),
    json_object(
      'tenant', NEW.tenant_id,
      'traceparent', json_extract(NEW.metadata, '$.traceparent'),
      'correlation_id', json_extract(NEW.metadata, '$.correlation_id'),
      'causation_id', json_extract(NEW.metadata, '$.causation_id'),
      'schema_version', NEW.event_schema_version),
    NEW.global_position);
END;

CREATE TABLE snapshots (
  tenant_id            TEXT NOT NULL,
  stream_id            TEXT NOT NULL,
  stream_type          TEXT NOT NULL,
  stream_version       INTEGER NOT NULL CHECK (stream_version >= 1),
  state                TEXT NOT NULL,
  state_schema_version INTEGER NOT NULL CHECK (state_schema_version >= 1),
  created_at           TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
  PRIMARY KEY (tenant_id, stream_id)
);

CREATE TABLE idempotency_keys (
  tenant_id       TEXT NOT NULL REFERENCES tenants (tenant_id),
  idempotency_key TEXT NOT NULL CHECK (length(idempotency_key) BETWEEN 1 AND 256),
  request_hash    TEXT NOT NULL,
  status          TEXT NOT NULL CHECK (status IN ('in_progress', 'completed')),
  response        TEXT,
  created_at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
  expires_at_ms   INTEGER NOT NULL,
  PRIMARY KEY (tenant_id, idempotency_key)
);
CREATE INDEX idempotency_keys_expiry ON idempotency_keys (expires_at_ms);

CREATE TABLE audit_log (
  audit_id       INTEGER PRIMARY KEY AUTOINCREMENT,
  tenant_id      TEXT NOT NULL,
  actor          TEXT NOT NULL,
  action         TEXT NOT NULL,
  target         TEXT NOT NULL,
  version_before INTEGER,
  version_after  INTEGER,
  trace_id       TEXT,
  details        TEXT NOT NULL DEFAULT '{}',
  at             TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX audit_log_tenant_at ON audit_log (tenant_id, at);

CREATE TRIGGER audit_log_append_only_update BEFORE UPDATE ON audit_log
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER audit_log_append_only_delete BEFORE DELETE ON audit_log
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
