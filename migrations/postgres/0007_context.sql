-- Shared context documents (a task's plan, working memory, file map) with
-- version vectors, optional CRDT merge state, and recent revisions kept for
-- computing deltas. Every change is announced on the `statefabric_context`
-- channel ("<tenant> <document> <revision>") so sidecars drop stale cache
-- entries at once.

CREATE TABLE context_documents (
  tenant_id      text NOT NULL REFERENCES tenants (tenant_id),
  document_id    text NOT NULL,
  merge_type     text NOT NULL CHECK (merge_type IN ('none', 'lww_register', 'lww_map', 'or_set', 'pn_counter')),
  content        jsonb NOT NULL,
  crdt_state     jsonb,
  version_vector jsonb NOT NULL DEFAULT '{}',
  revision       bigint NOT NULL CHECK (revision >= 1),
  deleted        boolean NOT NULL DEFAULT false,
  updated_at     timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (tenant_id, document_id)
);

CREATE TABLE context_revisions (
  tenant_id   text NOT NULL,
  document_id text NOT NULL,
  revision    bigint NOT NULL,
  content     jsonb NOT NULL,
  PRIMARY KEY (tenant_id, document_id, revision)
);

CREATE FUNCTION context_documents_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('statefabric_context', NEW.tenant_id || ' ' || NEW.document_id || ' ' || NEW.revision);
  RETURN NULL;
END
$$;
CREATE TRIGGER context_documents_notify
  AFTER INSERT OR UPDATE ON context_documents
  FOR EACH ROW EXECUTE FUNCTION context_documents_notify();

ALTER TABLE context_documents ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON context_documents
  USING (tenant_id = current_setting('statefabric.tenant', true))
  WITH CHECK (tenant_id = current_setting('statefabric.tenant', true));
ALTER TABLE context_revisions ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON context_revisions
  USING (tenant_id = current_setting('statefabric.tenant', true))
  WITH CHECK (tenant_id = current_setting('statefabric.tenant', true));

GRANT SELECT, INSERT, UPDATE ON context_documents TO statefabric_app_role;
GRANT SELECT, INSERT, DELETE ON context_revisions TO statefabric_app_role;
