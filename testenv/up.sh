#!/usr/bin/env bash
# Brings up every real service the integration tests use, on non-default
# ports, under one state directory ($STATEFABRIC_ENV_DIR, default
# /var/tmp/statefabric-env) with all logs in its logs/ folder:
#   PostgreSQL 15 (wal_level=logical), Redis 7 standalone and a 6-node cluster,
#   Kafka 4.x in KRaft mode, Kafka Connect with Debezium's Postgres connector,
#   Apicurio Registry (Confluent-compatible API), and a Kubernetes control
#   plane (etcd, kube-apiserver, kube-controller-manager; testenv/kubernetes.sh).
# Installs what is missing (Debian packages, Maven Central jars, Kubernetes
# built from the Go module proxy into a cache outside the clone). Idempotent:
# a service that already answers is left alone. Stop with testenv/down.sh.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source=kubernetes.sh
. "$TESTENV_DIR/kubernetes.sh"
# shellcheck source=chart-tools.sh
. "$TESTENV_DIR/chart-tools.sh"
# shellcheck source=python-clients.sh
. "$TESTENV_DIR/python-clients.sh"

mkdir -p "$STATE" "$LOGS" "$JARS"
chmod 755 "$STATE"

# ---------------------------------------------------------------- packages
# Also the Rust build's native needs (protoc, cmake, curl and ssl headers for
# librdkafka), so one call prepares a fresh Debian machine for the whole suite.
install_packages() {
  local wanted=(postgresql-15 redis-server redis-tools openjdk-17-jre-headless maven
                protobuf-compiler cmake libcurl4-openssl-dev pkg-config libssl-dev
                build-essential zlib1g-dev curl python3 python3-venv prometheus chromium etcd-server openssl
                iproute2)
  local missing=()
  for p in "${wanted[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if (( ${#missing[@]} )); then
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # The packages' own service units would grab the default ports; we run our
    # own instances, so keep the distribution's from starting.
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >"$LOGS/apt.log" 2>&1 \
      || { rm -f /usr/sbin/policy-rc.d; die "apt-get install failed; see $LOGS/apt.log"; }
    rm -f /usr/sbin/policy-rc.d
  fi
}

# The TypeScript SDK (sdk/typescript) is built and tested with Node.js 20 or
# newer and npm; Debian 12's own nodejs is 18, so it is a prerequisite, like
# Go for Kubernetes (its packages come from the npm registry, by lockfile).
check_node() {
  command -v node >/dev/null && command -v npm >/dev/null \
    || die "the TypeScript SDK's tests need Node.js 20 or newer with npm on PATH"
  local major
  major=$(node -p 'process.versions.node.split(".")[0]')
  (( major >= 20 )) || die "the TypeScript SDK's tests need Node.js 20 or newer (found $(node --version))"
}

# ---------------------------------------------------------------- jars
fetch_jars() {
  local mvn=(mvn -B -q -Dmaven.repo.local="${MAVEN_REPO:-$HOME/.m2/repository}")
  # The marker names the version and the pom's hash: a changed pom refetches.
  local kafka_done; kafka_done=$JARS/kafka/.done-$KAFKA_VERSION-$(sha1sum "$TESTENV_DIR/maven/kafka/pom.xml" | cut -c1-12)
  if [[ ! -f $kafka_done ]]; then
    log "fetching Kafka $KAFKA_VERSION jars from Maven Central"
    rm -rf "$JARS/kafka"
    "${mvn[@]}" -f "$TESTENV_DIR/maven/kafka/pom.xml" dependency:copy-dependencies \
      -Dkafka.version="$KAFKA_VERSION" -DincludeScope=runtime -DoutputDirectory="$JARS/kafka" \
      >"$LOGS/maven-kafka.log" 2>&1 || die "Maven fetch of Kafka failed; see $LOGS/maven-kafka.log"
    touch "$kafka_done"
  fi
  local plugin=$JARS/connect-plugins/debezium-connector-postgres
  if [[ ! -f $plugin/.done-$DEBEZIUM_VERSION ]]; then
    log "fetching Debezium $DEBEZIUM_VERSION Postgres connector from Maven Central"
    rm -rf "$plugin"
    "${mvn[@]}" -f "$TESTENV_DIR/maven/debezium/pom.xml" dependency:copy-dependencies \
      -Ddebezium.version="$DEBEZIUM_VERSION" -DincludeScope=runtime \
      -DexcludeGroupIds=org.apache.kafka -DoutputDirectory="$plugin" \
      >"$LOGS/maven-debezium.log" 2>&1 || die "Maven fetch of Debezium failed; see $LOGS/maven-debezium.log"
    touch "$plugin/.done-$DEBEZIUM_VERSION"
  fi
  if [[ ! -f $JARS/registry/.done-$APICURIO_VERSION ]]; then
    # The app zip is self-contained; its published pom names a parent that is
    # not on Maven Central, so it is fetched without its dependency graph.
    log "fetching Apicurio Registry $APICURIO_VERSION from Maven Central"
    rm -rf "$JARS/registry"
    "${mvn[@]}" dependency:get -Dtransitive=false \
      -Dartifact="io.apicurio:apicurio-registry-app:$APICURIO_VERSION:zip:all" \
      >"$LOGS/maven-registry.log" 2>&1 || die "Maven fetch of Apicurio failed; see $LOGS/maven-registry.log"
    local zip="${MAVEN_REPO:-$HOME/.m2/repository}/io/apicurio/apicurio-registry-app/$APICURIO_VERSION/apicurio-registry-app-$APICURIO_VERSION-all.zip"
    python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$zip" "$JARS/registry"
    touch "$JARS/registry/.done-$APICURIO_VERSION"
  fi
}

# ---------------------------------------------------------------- postgres
pg_ready() { "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT"; }

start_postgres() {
  local data=$STATE/postgres/data run=$STATE/postgres/run
  mkdir -p "$STATE/postgres" "$run"
  chown postgres:postgres "$STATE/postgres" "$run"
  touch "$LOGS/postgres.log"; chown postgres:postgres "$LOGS/postgres.log"
  if [[ ! -f $data/PG_VERSION ]]; then
    log "initialising Postgres data directory"
    runuser -u postgres -- "$PG_BIN/initdb" -D "$data" -U postgres \
      --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 >"$LOGS/initdb.log" 2>&1 \
      || die "initdb failed; see $LOGS/initdb.log"
    cat >> "$data/postgresql.conf" <<EOF
# --- statefabric test environment ---
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$run'
wal_level = logical
max_replication_slots = 16
max_wal_senders = 16
max_connections = 400
shared_buffers = 256MB
EOF
  fi
  # The port is read from the configuration at each start, so a data
  # directory made when services.env named another port follows it.
  if ! grep -qx "port = $PG_PORT" "$data/postgresql.conf"; then
    sed -i "s/^port = [0-9]*$/port = $PG_PORT/" "$data/postgresql.conf"
    if runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$data" status >/dev/null 2>&1; then
      log "restarting Postgres: its port changed"
      runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$data" -m fast -w stop >/dev/null
    fi
  fi
  if ! pg_ready; then
    ensure_ports_free Postgres "$PG_PORT"
    log "starting Postgres on $PG_PORT"
    runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$data" -l "$LOGS/postgres.log" -w -t 60 start >/dev/null \
      || die "Postgres did not start; see $LOGS/postgres.log"
  fi
  wait_for "Postgres" 60 pg_ready
  # Roles and database, created only where missing. The admin role owns the
  # schema and runs migrations; the app role is a plain login so Row-Level
  # Security applies to it; the CDC role may open replication connections.
  runuser -u postgres -- psql -q -h "$run" -p "$PG_PORT" -d postgres -v ON_ERROR_STOP=1 >/dev/null <<EOF
DO \$\$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$PG_ADMIN_USER') THEN
    CREATE ROLE $PG_ADMIN_USER LOGIN SUPERUSER PASSWORD '$PG_ADMIN_PASSWORD';
  END IF;
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$PG_APP_USER') THEN
    CREATE ROLE $PG_APP_USER LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE PASSWORD '$PG_APP_PASSWORD';
  END IF;
  -- The group role the migrations grant table privileges to (they create it
  -- too; creating it here lets the app login join it before they run).
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'statefabric_app_role') THEN
    CREATE ROLE statefabric_app_role NOLOGIN NOBYPASSRLS;
  END IF;
  -- The control plane: the app role's grants (leader leases) plus the
  -- outbox relay's functions, which read and delete across tenants.
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'statefabric_relay_role') THEN
    CREATE ROLE statefabric_relay_role NOLOGIN NOBYPASSRLS;
  END IF;
  -- The saga engine (control plane leader): every tenant's saga rows.
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'statefabric_saga_engine_role') THEN
    CREATE ROLE statefabric_saga_engine_role NOLOGIN NOBYPASSRLS;
  END IF;
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$PG_CONTROL_USER') THEN
    CREATE ROLE $PG_CONTROL_USER LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE PASSWORD '$PG_CONTROL_PASSWORD';
  END IF;
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$PG_CDC_USER') THEN
    CREATE ROLE $PG_CDC_USER LOGIN REPLICATION NOSUPERUSER PASSWORD '$PG_CDC_PASSWORD';
  END IF;
END \$\$;
SELECT 'CREATE DATABASE $PG_DATABASE OWNER $PG_ADMIN_USER'
  WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$PG_DATABASE') \gexec
GRANT CONNECT, TEMPORARY ON DATABASE $PG_DATABASE TO $PG_APP_USER, $PG_CDC_USER, $PG_CONTROL_USER;
GRANT statefabric_app_role TO $PG_APP_USER, $PG_CONTROL_USER;
GRANT statefabric_relay_role, statefabric_saga_engine_role TO $PG_CONTROL_USER;
DO \$\$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'statefabric_cdc_role') THEN
    CREATE ROLE statefabric_cdc_role NOLOGIN NOBYPASSRLS;
  END IF;
END \$\$;
GRANT statefabric_cdc_role TO $PG_CDC_USER;
EOF
}

# ---------------------------------------------------------------- redis
redis_up() { redis-cli -p "$1" ping 2>/dev/null | grep -q PONG; }

start_redis_node() {
  local port=$1 dir=$STATE/redis/$1; shift
  mkdir -p "$dir"
  redis_up "$port" && return 0
  ensure_ports_free "Redis $port" "$port" $([[ $* == *cluster-enabled* ]] && echo $(( port + 10000 )))
  redis-server --port "$port" --bind 127.0.0.1 --dir "$dir" --daemonize yes \
    --pidfile "$dir/redis.pid" --logfile "$LOGS/redis-$port.log" \
    --save "" --appendonly no "$@" || die "redis on $port did not start; see $LOGS/redis-$port.log"
}

cluster_ok() { redis-cli -p "$1" cluster info 2>/dev/null | grep -q 'cluster_state:ok'; }

# A slot left open on a node (importing or migrating: a slot move cut
# short, or a failover in the middle of one) makes that node ignore news of
# the slot's owner and report the cluster down to every client it serves.
# Closing it lets the node take the owner the others agree on.
close_open_slots() {
  local p slot
  for p in "$@"; do
    for slot in $(redis-cli -p "$p" cluster nodes 2>/dev/null | awk '/myself/' \
        | grep -o '\[[0-9]*-[<>]-' | tr -d '[' | cut -d- -f1); do
      log "closing open slot $slot on Redis cluster node $p"
      redis-cli -p "$p" cluster setslot "$slot" stable >/dev/null
    done
  done
}

# Nodes of ports services.env no longer names (it named others before) are
# stopped and their data deleted: a cluster is made anew on the new ports.
stop_stale_redis() {
  local dir port
  for dir in "$STATE"/redis/*/; do
    [[ -d $dir ]] || continue
    port=$(basename "$dir")
    [[ ,$REDIS_PORT,$REDIS_CLUSTER_PORTS, == *,$port,* ]] && continue
    redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true
    rm -rf "$dir"
    log "removed the Redis node of port $port (no longer in services.env)"
  done
}

start_redis() {
  stop_stale_redis
  start_redis_node "$REDIS_PORT"
  local ports; IFS=, read -r -a ports <<< "$REDIS_CLUSTER_PORTS"
  for p in "${ports[@]}"; do
    start_redis_node "$p" --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 3000
  done
  for p in "$REDIS_PORT" "${ports[@]}"; do wait_for "Redis $p" 30 redis_up "$p"; done
  if ! cluster_ok "${ports[0]}"; then
    local known; known=$(redis-cli -p "${ports[0]}" cluster info | tr -d '\r' | awk -F: '/cluster_known_nodes/{print $2}')
    if [[ $known == 1 ]]; then
      log "creating the Redis cluster (3 primaries, 3 replicas)"
      redis-cli --cluster create $(printf '127.0.0.1:%s ' "${ports[@]}") --cluster-replicas 1 --cluster-yes \
        >"$LOGS/redis-cluster-create.log" 2>&1 || die "cluster create failed; see $LOGS/redis-cluster-create.log"
    fi
  fi
  close_open_slots "${ports[@]}"
  for p in "${ports[@]}"; do wait_for "Redis cluster node $p" 60 cluster_ok "$p"; done
  # A memory cap (for the 80 % alert) on every node; in the cluster, let a
  # replica take over however long it was cut off (the failover test pauses
  # primaries back to back, which would otherwise leave stale replicas that
  # refuse to stand in).
  for p in "$REDIS_PORT" "${ports[@]}"; do
    redis-cli -p "$p" config set maxmemory 256mb >/dev/null
    redis-cli -p "$p" config set maxmemory-policy noeviction >/dev/null
  done
  for p in "${ports[@]}"; do
    redis-cli -p "$p" config set cluster-replica-validity-factor 0 >/dev/null
  done
}

# ---------------------------------------------------------------- kafka
write_log4j() {
  cat > "$STATE/log4j2.properties" <<'EOF'
status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = OUT
logger.reflections.name = org.reflections
logger.reflections.level = ERROR
EOF
}

# SCRAM users exist from the storage format on (KRaft keeps them in its
# metadata), so a change of users or of the listener layout reformats the
# test broker: its data is disposable. The controller listener uses PLAIN
# (SCRAM is not available to KRaft controllers); clients and inter-broker
# traffic use SCRAM-SHA-512.
kafka_layout() {
  printf '%s\n' sasl-v1 "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT" "$KAFKA_SASL_MECHANISM" \
    "$KAFKA_ADMIN_USER:$KAFKA_ADMIN_PASSWORD" "$KAFKA_CONTROL_USER:$KAFKA_CONTROL_PASSWORD" \
    "$KAFKA_SIDECAR_USER:$KAFKA_SIDECAR_PASSWORD" "$KAFKA_CONNECT_USER:$KAFKA_CONNECT_PASSWORD" \
    "$KAFKA_INTRUDER_USER:$KAFKA_INTRUDER_PASSWORD" | sha1sum | cut -c1-16
}

# scram_jaas USER PASSWORD: a client login for the SCRAM listener.
scram_jaas() {
  printf 'org.apache.kafka.common.security.scram.ScramLoginModule required username="%s" password="%s";' "$1" "$2"
}

# client_props PREFIX USER PASSWORD: client settings for Kafka's own tools
# and for Connect (which takes them once per client kind, by prefix).
client_props() {
  printf '%ssecurity.protocol=SASL_PLAINTEXT\n%ssasl.mechanism=%s\n%ssasl.jaas.config=%s\n' \
    "$1" "$1" "$KAFKA_SASL_MECHANISM" "$1" "$(scram_jaas "$2" "$3")"
}

# Stops the broker and deletes its data, so the next start formats it.
kafka_wipe() {
  stop_pid connect   # its state topics go with the broker's data
  stop_pid kafka
  rm -rf "$STATE/kafka/data" "$STATE/kafka/acls.applied" "$STATE/kafka/layout"
}

start_kafka() {
  local dir=$STATE/kafka props=$STATE/kafka/server.properties layout; layout=$(kafka_layout)
  mkdir -p "$dir"
  local plain_jaas="org.apache.kafka.common.security.plain.PlainLoginModule required username=\"$KAFKA_ADMIN_USER\" password=\"$KAFKA_ADMIN_PASSWORD\" user_$KAFKA_ADMIN_USER=\"$KAFKA_ADMIN_PASSWORD\";"
  local mech_lower; mech_lower=$(tr 'A-Z' 'a-z' <<<"$KAFKA_SASL_MECHANISM")
  cat > "$props" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$KAFKA_CONTROLLER_PORT
listeners=CLIENT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
advertised.listeners=CLIENT://127.0.0.1:$KAFKA_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=CLIENT
listener.security.protocol.map=CLIENT:SASL_PLAINTEXT,CONTROLLER:SASL_PLAINTEXT
sasl.enabled.mechanisms=$KAFKA_SASL_MECHANISM
sasl.mechanism.inter.broker.protocol=$KAFKA_SASL_MECHANISM
listener.name.client.$mech_lower.sasl.jaas.config=$(scram_jaas "$KAFKA_ADMIN_USER" "$KAFKA_ADMIN_PASSWORD")
sasl.mechanism.controller.protocol=PLAIN
listener.name.controller.sasl.enabled.mechanisms=PLAIN
listener.name.controller.plain.sasl.jaas.config=$plain_jaas
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
super.users=User:$KAFKA_ADMIN_USER
allow.everyone.if.no.acl.found=false
log.dirs=$dir/data
num.partitions=3
offsets.topic.replication.factor=1
offsets.topic.num.partitions=10
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=10
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=true
EOF
  client_props "" "$KAFKA_ADMIN_USER" "$KAFKA_ADMIN_PASSWORD" > "$dir/admin.properties"
  if [[ $(cat "$dir/layout" 2>/dev/null) != "$layout" ]]; then
    kafka_wipe
  fi
  # Kafka's own defaults for a broker (kafka-server-start.sh and
  # kafka-run-class.sh): a fixed 1 GiB heap and G1 aiming at 20 ms pauses.
  # The serial collector the other JVMs use stopped the broker for 20-80 ms
  # per young collection and ~300 ms per full one under the benchmarks' load,
  # which every client's latency then showed. GC pauses go to kafka-gc.log.
  local jvm=(-Xms1g -Xmx1g -XX:+UseG1GC -XX:MaxGCPauseMillis=20
    -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent
    -Xlog:gc:file="$LOGS/kafka-gc.log":time,uptime:filecount=2,filesize=20m
    -Djava.awt.headless=true
    -Dlog4j2.configurationFile="$STATE/log4j2.properties" -cp "$JARS/kafka/*" kafka.Kafka "$props")
  java_current kafka "${jvm[@]}" && port_open "$KAFKA_PORT" && return 0
  if [[ ! -f $dir/data/meta.properties ]]; then
    local id; id=$(python3 -c 'import base64, uuid; print(base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("="))')
    local scram=() u
    for u in ADMIN CONTROL SIDECAR CONNECT INTRUDER; do
      local user=KAFKA_${u}_USER password=KAFKA_${u}_PASSWORD
      scram+=(--add-scram "$KAFKA_SASL_MECHANISM=[name=${!user},password=${!password}]")
    done
    log "formatting Kafka storage (cluster $id) with the SCRAM users"
    "$JAVA" "${JVM_COMMON[@]}" -Dlog4j2.configurationFile="$STATE/log4j2.properties" -cp "$JARS/kafka/*" \
      kafka.tools.StorageTool format -t "$id" -c "$props" "${scram[@]}" >"$LOGS/kafka-format.log" 2>&1 \
      || die "Kafka storage format failed; see $LOGS/kafka-format.log"
    echo "$layout" > "$dir/layout"
  fi
  ensure_ports_free Kafka "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT"
  log "starting Kafka on $KAFKA_PORT"
  start_java kafka "$LOGS/kafka.log" "${jvm[@]}"
  kafka_started=1
}

# Applies testenv/kafka-acls.tsv (once per content: each line is a JVM run).
apply_kafka_acls() {
  local dir=$STATE/kafka table=$TESTENV_DIR/kafka-acls.tsv digest
  digest=$(sha1sum "$table" | cut -c1-16)
  [[ $(cat "$dir/acls.applied" 2>/dev/null) == "$digest" ]] && return 0
  log "applying the Kafka ACLs ($table)"
  local principal resource pattern name ops
  while IFS=$'\t' read -r principal resource pattern name ops; do
    [[ -z $principal || $principal == \#* ]] && continue
    local user_var=KAFKA_${principal^^}_USER args op op_list
    args=(--add --force --allow-principal "User:${!user_var}" --resource-pattern-type "$pattern")
    case $resource in
      topic) args+=(--topic "$name") ;;
      group) args+=(--group "$name") ;;
      transactionalId) args+=(--transactional-id "$name") ;;
      cluster) args+=(--cluster) ;;
      *) die "kafka-acls.tsv: unknown resource $resource" ;;
    esac
    IFS=, read -r -a op_list <<< "$ops"
    for op in "${op_list[@]}"; do args+=(--operation "$op"); done
    kafka_tool org.apache.kafka.tools.AclCommand "${args[@]}" >>"$LOGS/kafka-acls.log" 2>&1 \
      || die "applying a Kafka ACL failed ($principal $resource $name); see $LOGS/kafka-acls.log"
  done < "$table"
  echo "$digest" > "$dir/acls.applied"
}

kafka_ready() { port_open "$KAFKA_PORT" && grep -q "Kafka Server started" "$LOGS/kafka.log"; }

# True unless the broker refuses the admin's SCRAM login. Once, a broker
# restarted on the metadata of a long test run (after the machine stopped
# it) refused every user's login, persistently, though its log still held
# every credential; a direct restart did not reproduce it. The broker's data
# is disposable, so a refused login means: format it again (kafka_reformat).
kafka_admin_login_ok() {
  local out
  out=$(timeout 90 "$JAVA" "${JVM_COMMON[@]}" -Dlog4j2.configurationFile="$STATE/log4j2.properties" \
    -cp "$JARS/kafka/*" org.apache.kafka.tools.TopicCommand --list \
    --bootstrap-server "127.0.0.1:$KAFKA_PORT" --command-config "$STATE/kafka/admin.properties" 2>&1) && return 0
  ! grep -q "SaslAuthenticationException\|invalid credentials" <<<"$out"
}

kafka_reformat() {
  log "Kafka refused the admin's SCRAM login on its existing metadata; formatting its storage again"
  kafka_wipe
  start_kafka
  wait_for "Kafka" 120 kafka_ready
}

start_connect() {
  local props=$STATE/connect.properties
  cat > "$props" <<EOF
bootstrap.servers=127.0.0.1:$KAFKA_PORT
$(client_props "" "$KAFKA_CONNECT_USER" "$KAFKA_CONNECT_PASSWORD")
$(client_props producer. "$KAFKA_CONNECT_USER" "$KAFKA_CONNECT_PASSWORD")
$(client_props consumer. "$KAFKA_CONNECT_USER" "$KAFKA_CONNECT_PASSWORD")
$(client_props admin. "$KAFKA_CONNECT_USER" "$KAFKA_CONNECT_PASSWORD")
group.id=statefabric-connect
listeners=http://127.0.0.1:$CONNECT_PORT
rest.advertised.host.name=127.0.0.1
rest.advertised.port=$CONNECT_PORT
config.storage.topic=_connect-configs
offset.storage.topic=_connect-offsets
status.storage.topic=_connect-status
config.storage.replication.factor=1
offset.storage.replication.factor=1
status.storage.replication.factor=1
offset.flush.interval.ms=1000
key.converter=org.apache.kafka.connect.json.JsonConverter
value.converter=org.apache.kafka.connect.json.JsonConverter
plugin.path=$JARS/connect-plugins
EOF
  local jvm=("${JVM_COMMON[@]}" -Xmx768m
    -Dlog4j2.configurationFile="$STATE/log4j2.properties" -cp "$JARS/kafka/*"
    org.apache.kafka.connect.cli.ConnectDistributed "$props")
  java_current connect "${jvm[@]}" && port_open "$CONNECT_PORT" && return 0
  stop_pid connect   # one whose properties (its port) changed
  ensure_ports_free "Kafka Connect" "$CONNECT_PORT"
  log "starting Kafka Connect on $CONNECT_PORT"
  start_java connect "$LOGS/connect.log" "${jvm[@]}"
}

connect_ready() {
  # A worker that stopped (it exits when it cannot reach or log in to the
  # broker) will not become ready: say so now rather than after the timeout.
  pid_alive connect || { log "Kafka Connect exited; the end of $LOGS/connect.log:" 2>&3; tail -n 5 "$LOGS/connect.log" >&3; exit 1; }
  curl -fsS "http://127.0.0.1:$CONNECT_PORT/connector-plugins" | grep -q PostgresConnector
}

# ---------------------------------------------------------------- registry
start_registry() {
  # In-memory (H2) storage: a test environment keeps no registry state across
  # restarts; schemas are registered idempotently by whatever needs them.
  local jvm=("${JVM_COMMON[@]}" -Xmx512m
    -Dquarkus.http.host=127.0.0.1 -Dquarkus.http.port="$REGISTRY_PORT"
    -jar "$JARS/registry/apicurio-registry-app-$APICURIO_VERSION-runner.jar")
  java_current registry "${jvm[@]}" && port_open "$REGISTRY_PORT" && return 0
  ensure_ports_free "Apicurio Registry" "$REGISTRY_PORT"
  log "starting Apicurio Registry on $REGISTRY_PORT"
  start_java registry "$LOGS/registry.log" "${jvm[@]}"
}

registry_ready() { curl -fsS "http://127.0.0.1:$REGISTRY_PORT/apis/ccompat/v7/subjects" >/dev/null; }

# ---------------------------------------------------------------- main
started=$SECONDS
install_packages
fetch_jars
write_log4j
start_postgres
start_redis
start_kafka
start_registry            # independent of Kafka: boots while the broker does
wait_for "Kafka" 120 kafka_ready
# Logins are checked after a (re)start of the broker, or while no Connect
# worker runs (one that runs has logged in; it exits when it cannot): a
# healthy environment is not held up by a JVM tool run.
if [[ -n ${kafka_started:-} ]] || ! pid_alive connect; then
  kafka_admin_login_ok || kafka_reformat
fi
apply_kafka_acls
start_connect
# Kubernetes starts while the JVMs boot (its first build takes minutes).
start_kubernetes
prepare_chart_tools
prepare_python_clients
check_node
wait_for "Schema Registry" 120 registry_ready
# wait_for silences its probe; fd 3 lets connect_ready still say why it gave up.
wait_for "Kafka Connect (with Debezium)" 180 connect_ready 3>&2

cat > "$STATE/env.sh" <<EOF
# Written by testenv/up.sh. Source it to point tools at the test environment.
export STATEFABRIC_TEST_PG_ADMIN_URL=postgres://$PG_ADMIN_USER:$PG_ADMIN_PASSWORD@127.0.0.1:$PG_PORT/$PG_DATABASE
export STATEFABRIC_TEST_PG_APP_URL=postgres://$PG_APP_USER:$PG_APP_PASSWORD@127.0.0.1:$PG_PORT/$PG_DATABASE
export STATEFABRIC_TEST_PG_CONTROL_URL=postgres://$PG_CONTROL_USER:$PG_CONTROL_PASSWORD@127.0.0.1:$PG_PORT/$PG_DATABASE
export STATEFABRIC_TEST_REDIS_URL=redis://127.0.0.1:$REDIS_PORT
export STATEFABRIC_TEST_REDIS_CLUSTER=$(IFS=,; for p in $REDIS_CLUSTER_PORTS; do printf 'redis://127.0.0.1:%s,' "$p"; done | sed 's/,$//')
export STATEFABRIC_TEST_KAFKA_BOOTSTRAP=127.0.0.1:$KAFKA_PORT
# Kafka's own tools (Java), for what librdkafka cannot ask the broker.
export STATEFABRIC_TEST_KAFKA_TOOLS_CLASSPATH='$JARS/kafka/*'
export STATEFABRIC_TEST_KAFKA_ADMIN_PROPERTIES=$STATE/kafka/admin.properties
export STATEFABRIC_TEST_CONNECT_URL=http://127.0.0.1:$CONNECT_PORT
export STATEFABRIC_TEST_REGISTRY_URL=http://127.0.0.1:$REGISTRY_PORT/apis/ccompat/v7
export STATEFABRIC_TEST_KUBECONFIG=$KUBE_STATE/admin.kubeconfig
export STATEFABRIC_TEST_KUBECTL=$KUBE_TOOLS/kubectl
export STATEFABRIC_TEST_HELM=$HELM
# A python3 with the clients of testenv/python-clients.txt (openai).
export STATEFABRIC_TEST_PYTHON=$(python_clients_venv)/bin/python
# One directory per operator: keda-*, prometheus-operator-*, cnpg-*, cert-manager-*.
export STATEFABRIC_TEST_THIRD_PARTY_CRDS=$THIRD_PARTY_CRDS
EOF
log "all services up in $(( SECONDS - started ))s; logs in $LOGS; addresses in $STATE/env.sh"
