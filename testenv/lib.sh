# Shared by testenv/up.sh and testenv/down.sh: locations and small helpers.
# shellcheck shell=bash

TESTENV_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=services.env
set -a; . "$TESTENV_DIR/services.env"; set +a

# Everything the environment writes lives under one directory. It must be
# traversable by the `postgres` user (Postgres refuses to run as root), so it
# is outside /root by default.
STATE=${STATEFABRIC_ENV_DIR:-/var/tmp/statefabric-env}
LOGS=$STATE/logs
JARS=$STATE/jars
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
JAVA=${JAVA:-java}
JVM_COMMON=(-Xms64m -XX:+UseSerialGC -Djava.awt.headless=true)

log() { printf '[testenv %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# wait_for DESCRIPTION SECONDS COMMAND...: polls COMMAND until it succeeds.
wait_for() {
  local what=$1 timeout=$2; shift 2
  local start=$SECONDS
  until "$@" >/dev/null 2>&1; do
    if (( SECONDS - start >= timeout )); then
      log "$what did not become ready within ${timeout}s; see $LOGS"
      return 1
    fi
    sleep 0.5
  done
  log "$what ready ($(( SECONDS - start ))s)"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# port_holders PORT: the sockets whose local end is PORT, except those in
# TIME-WAIT (which a listener's SO_REUSEADDR binds over).
port_holders() {
  ss -Htanp state all "( sport = :$1 )" 2>/dev/null | grep -v '^TIME-WAIT' || true
}

# ensure_ports_free NAME PORT...: called just before NAME starts. A port
# still held (a process of an earlier run stopping, a client connection's
# local end) is waited for, up to 30 s; then the start fails naming what
# holds it, rather than leaving the service to die on its bind unseen.
ensure_ports_free() {
  local name=$1 port held; shift
  for port in "$@"; do
    local start=$SECONDS
    while held=$(port_holders "$port"); [[ -n $held ]]; do
      if (( SECONDS - start >= 30 )); then
        die "$name cannot start: port $port is taken by: $held"
      fi
      sleep 0.5
    done
  done
}

# pid_alive NAME: true if the process recorded in $STATE/NAME.pid runs.
pid_alive() {
  local f=$STATE/$1.pid
  [[ -f $f ]] && kill -0 "$(cat "$f")" 2>/dev/null
}

# start_process NAME LOGFILE COMMAND...: starts COMMAND in its own session,
# detached from this shell, and records its pid and command line.
start_process() {
  local name=$1 logfile=$2; shift 2
  setsid nohup "$@" >"$logfile" 2>&1 < /dev/null &
  echo $! > "$STATE/$name.pid"
  printf '%s\n' "$@" > "$STATE/$name.args"
}

# process_current NAME COMMAND...: true if NAME runs with exactly this
# command line. One that runs with another (a changed heap, flag or binary)
# is stopped, so the caller starts it again as it is now declared.
process_current() {
  local name=$1; shift
  pid_alive "$name" || return 1
  [[ $(cat "$STATE/$name.args" 2>/dev/null) == "$(printf '%s\n' "$@")" ]] && return 0
  log "restarting $name: its command line changed"
  stop_pid "$name"
  return 1
}

# start_java / java_current: the same for a JVM (ARGS are the JVM's).
start_java() { local name=$1 logfile=$2; shift 2; start_process "$name" "$logfile" "$JAVA" "$@"; }
java_current() { local name=$1; shift; process_current "$name" "$JAVA" "$@"; }

# kafka_tool CLASS ARGS...: runs one of Kafka's command-line tools against
# the test broker as the admin.
kafka_tool() {
  "$JAVA" "${JVM_COMMON[@]}" -Dlog4j2.configurationFile="$STATE/log4j2.properties" -cp "$JARS/kafka/*" \
    "$@" --bootstrap-server "127.0.0.1:$KAFKA_PORT" --command-config "$STATE/kafka/admin.properties"
}

stop_pid() {
  local name=$1 f=$STATE/$1.pid
  [[ -f $f ]] || return 0
  local pid; pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$pid" 2>/dev/null || true
    log "stopped $name"
  fi
  rm -f "$f"
}
