-- A transition updates its saga's row; with no index on a column it
-- changes (status, progressed_at) and room left in the page, Postgres
-- updates it in place (HOT) instead of adding entries to every index. Open
-- sagas are found by definition (stuck detection, the stuck filter) through
-- an index on a column that never changes, limited to open sagas (ended_at
-- is set once).
DROP INDEX saga_instances_open;
CREATE INDEX saga_instances_open_by_definition ON saga_instances (definition)
  WHERE ended_at IS NULL;
ALTER TABLE saga_instances SET (fillfactor = 80);
ALTER TABLE saga_tasks SET (fillfactor = 80);
