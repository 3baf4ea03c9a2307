-- Shared context documents for the embedded store (see the Postgres
-- migration 0007 for the model). Change notification is in-process.

CREATE TABLE context_documents (
  tenant_id      TEXT NOT NULL REFERENCES tenants (tenant_id),
  document_id    TEXT NOT NULL,
  merge_type     TEXT NOT NULL CHECK (merge_type IN ('none', 'lww_register', 'lww_map', 'or_set', 'pn_counter')),
  content        TEXT NOT NULL,
  crdt_state     TEXT,
  version_vector TEXT NOT NULL DEFAULT '{}',
  revision       INTEGER NOT NULL CHECK (revision >= 1),
  deleted        INTEGER NOT NULL DEFAULT 0,
  updated_at     TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
  PRIMARY KEY (tenant_id, document_id)
);

CREATE TABLE context_revisions (
  tenant_id   TEXT NOT NULL,
  document_id TEXT NOT NULL,
  revision    INTEGER NOT NULL,
  content     TEXT NOT NULL,
  PRIMARY KEY (tenant_id, document_id, revision)
);
