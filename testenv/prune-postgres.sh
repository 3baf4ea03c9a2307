#!/usr/bin/env bash
# Deletes what test and benchmark runs left in the test database: the rows
# of every tenant whose id carries a run id (`t-<hex>`, `t<hex>`,
# `bench-<hex>`: every test and benchmark names its tenants so), in every
# table with a `tenant_id` column (found in the catalog, so a new table is
# not missed), then the tenants. Each suite run adds a few hundred tenants
# with their events, outbox rows, sagas and audit rows; a database that
# keeps them all grows by every run and slows the runs and benchmarks after
# it. scripts/test.sh calls this after the suite, beside prune-kafka.sh.
# Best effort: a failure is reported, never fatal. Do not run it while tests
# are running: it deletes their tenants too.
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

port_open "$PG_PORT" || { log "Postgres is not running: nothing to prune"; exit 0; }
export PGPASSWORD=$PG_ADMIN_PASSWORD
psql() {
  "$PG_BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U "$PG_ADMIN_USER" -d "$PG_DATABASE" \
    -v ON_ERROR_STOP=1 -qAt "$@"
}
RUN_TENANT='^(t-?|bench-)[0-9a-f]{8,}$'

count=$(psql -c "SELECT count(*) FROM tenants WHERE tenant_id ~ '$RUN_TENANT'") \
  || { log "could not count the test tenants; nothing pruned"; exit 0; }
(( count > 0 )) || exit 0
# One transaction per table keeps each lock short; the tenants go last,
# since streams and context documents refer to them (saga children cascade
# from their instances).
if psql <<SQL
DO \$\$
DECLARE t text;
BEGIN
  FOR t IN SELECT c.table_name
             FROM information_schema.columns c
             JOIN information_schema.tables tb USING (table_schema, table_name)
            WHERE c.table_schema = 'public' AND c.column_name = 'tenant_id'
              AND tb.table_type = 'BASE TABLE' AND c.table_name <> 'tenants'
  LOOP
    EXECUTE format('DELETE FROM %I WHERE tenant_id ~ %L', t, '$RUN_TENANT');
    COMMIT;
  END LOOP;
  DELETE FROM tenants WHERE tenant_id ~ '$RUN_TENANT';
END
\$\$;
SQL
then
  log "deleted the rows of $count tenants of earlier runs"
else
  log "pruning the test tenants failed (see above); left for the next run"
fi
exit 0
