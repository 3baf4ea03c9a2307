-- Fewer pages written per context write (issue #25). A last-write-wins
-- write appended six WAL frames: the document, the revision and the
-- revision's primary-key index, the audit row and its index, and
-- `sqlite_sequence` for the audit log's AUTOINCREMENT.
--
-- * `context_revisions` becomes a WITHOUT ROWID table: its rows live in
--   the primary key's b-tree, one page written instead of two.
-- * `audit_log` drops AUTOINCREMENT. Its only effect was never reusing an
--   id of a deleted row, and the log refuses deletes (its triggers, kept
--   below), so ids still only grow: each is one more than the largest.
--
-- Both are rebuilt and their rows copied as they are (ids kept).

CREATE TABLE context_revisions_rebuilt (
  tenant_id   TEXT NOT NULL,
  document_id TEXT NOT NULL,
  revision    INTEGER NOT NULL,
  content     TEXT NOT NULL,
  PRIMARY KEY (tenant_id, document_id, revision)
) WITHOUT ROWID;
INSERT INTO context_revisions_rebuilt (tenant_id, document_id, revision, content)
  SELECT tenant_id, document_id, revision, content FROM context_revisions;
DROP TABLE context_revisions;
ALTER TABLE context_revisions_rebuilt RENAME TO context_revisions;

CREATE TABLE audit_log_rebuilt (
  audit_id       INTEGER PRIMARY KEY,
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
INSERT INTO audit_log_rebuilt (audit_id, tenant_id, actor, action, target, version_before,
                               version_after, trace_id, details, at)
  SELECT audit_id, tenant_id, actor, action, target, version_before,
         version_after, trace_id, details, at
    FROM audit_log;
-- Dropping the table drops its index, its triggers and its sqlite_sequence row.
DROP TABLE audit_log;
ALTER TABLE audit_log_rebuilt RENAME TO audit_log;
CREATE INDEX audit_log_tenant_at ON audit_log (tenant_id, at);
CREATE TRIGGER audit_log_append_only_update BEFORE UPDATE ON audit_log
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER audit_log_append_only_delete BEFORE DELETE ON audit_log
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
