-- Change data capture of the outbox (Debezium's Postgres connector with
-- pgoutput). The publication is created here, by the schema owner, so the
-- CDC login needs no ownership (publication.autocreate.mode = disabled);
-- inserts only: the relay's deletes are not events.

CREATE PUBLICATION statefabric_outbox FOR TABLE event_outbox WITH (publish = 'insert');

DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'statefabric_cdc_role') THEN
    CREATE ROLE statefabric_cdc_role NOLOGIN NOBYPASSRLS;
  END IF;
END $$;

-- Debezium reads the table's definition (no rows: the connector starts
-- without a snapshot, from the slot).
GRANT SELECT ON event_outbox TO statefabric_cdc_role;
