-- Streams (one row per aggregate: its type and current version) and the
-- append-only event store.
--
-- Appends lock the stream's row (UPDATE ... WHERE version = expected), so
-- concurrent writers to one stream serialize there and exactly one wins each
-- version; the unique (tenant, stream, version) constraint is the backstop.
--
-- global_position is assigned at insert time, so positions become visible out
-- of order when transactions commit out of order. transaction_id (xid8) lets a
-- reader advance only past transactions that have all finished: see the
-- commit-ordered feed in the store crate (pg/feed.rs).

CREATE TABLE streams (
  tenant_id   text NOT NULL REFERENCES tenants (tenant_id),
  stream_id   text NOT NULL,
  stream_type text NOT NULL,
  version     bigint NOT NULL CHECK (version >= 1),
  created_at  timestamptz NOT NULL DEFAULT now(),
  updated_at  timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (tenant_id, stream_id)
);

CREATE TABLE event_store (
  global_position      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  event_id             uuid NOT NULL UNIQUE,
  tenant_id            text NOT NULL,
  stream_id            text NOT NULL,
  stream_type          text NOT NULL,
  event_type           text NOT NULL,
  event_schema_version integer NOT NULL CHECK (event_schema_version >= 1),
  data                 jsonb NOT NULL,
  metadata             jsonb NOT NULL DEFAULT '{}',
  stream_version       bigint NOT NULL CHECK (stream_version >= 1),
  transaction_id       xid8 NOT NULL DEFAULT pg_current_xact_id(),
  created_at           timestamptz NOT NULL DEFAULT now(),
  UNIQUE (tenant_id, stream_id, stream_version)
);
-- The per-tenant commit-ordered feed and the per-tenant position order.
CREATE INDEX event_store_tenant_commit_order
  ON event_store (tenant_id, transaction_id, global_position);
CREATE INDEX event_store_tenant_position ON event_store (tenant_id, global_position);

ALTER TABLE streams ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON streams
  USING (tenant_id = current_setting('statefabric.tenant', true))
  WITH CHECK (tenant_id = current_setting('statefabric.tenant', true));

ALTER TABLE event_store ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON event_store
  USING (tenant_id = current_setting('statefabric.tenant', true))
  WITH CHECK (tenant_id = current_setting('statefabric.tenant', true));

GRANT SELECT, INSERT, UPDATE ON streams TO statefabric_app_role;
-- Events are immutable: no UPDATE or DELETE for the application.
GRANT SELECT, INSERT ON event_store TO statefabric_app_role;
