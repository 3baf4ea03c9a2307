-- The transactional outbox, filled by a trigger on every insert into the
-- event store, so no code path can write an event without its outbox row.
--
-- Columns follow what Debezium's outbox EventRouter expects (id,
-- aggregatetype, aggregateid, type, payload), plus tenant, headers (trace
-- context, correlation id) and the commit-order columns the built-in relay
-- reads by. A statement-level trigger with a transition table keeps a batch
-- append to one extra INSERT ... SELECT.

CREATE TABLE event_outbox (
  id              uuid PRIMARY KEY,
  tenant_id       text NOT NULL,
  aggregatetype   text NOT NULL,
  aggregateid     text NOT NULL,
  type            text NOT NULL,
  payload         jsonb NOT NULL,
  headers         jsonb NOT NULL DEFAULT '{}',
  global_position bigint NOT NULL,
  transaction_id  xid8 NOT NULL DEFAULT pg_current_xact_id(),
  created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX event_outbox_commit_order ON event_outbox (transaction_id, global_position);

CREATE FUNCTION event_store_to_outbox() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO event_outbox (id, tenant_id, aggregatetype, aggregateid, type, payload, headers, global_position)
  SELECT e.event_id,
         e.tenant_id,
         e.stream_type,
         e.stream_id,
         e.event_type,
         jsonb_build_object(
           'id', e.event_id,
           'tenant', e.tenant_id,
           'stream_id', e.stream_id,
           'stream_type', e.stream_type,
           'stream_version', e.stream_version,
           'event_type', e.event_type,
           'schema_version', e.event_schema_version,
           'global_position', e.global_position,
           'created_at', e.created_at,
           'data', e.data,
           'metadata', e.metadata),
         jsonb_strip_nulls(jsonb_build_object(
           'tenant', e.tenant_id,
           'traceparent', e.metadata ->> 'traceparent',
           'correlation_id', e.metadata ->> 'correlation_id',
           'causation_id', e.metadata ->> 'causation_id',
           'schema_version', e.event_schema_version)),
         e.global_position
    FROM new_events e;
  RETURN NULL;
END
$$;

CREATE TRIGGER event_store_outbox
  AFTER INSERT ON event_store
  REFERENCING NEW TABLE AS new_events
  FOR EACH STATEMENT EXECUTE FUNCTION event_store_to_outbox();

ALTER TABLE event_outbox ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON event_outbox
  USING (tenant_id = current_setting('statefabric.tenant', true))
  WITH CHECK (tenant_id = current_setting('statefabric.tenant', true));

-- The relay marks and removes what it has sent.
GRANT SELECT, INSERT, DELETE ON event_outbox TO statefabric_app_role;
