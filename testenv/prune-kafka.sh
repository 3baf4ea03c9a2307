#!/usr/bin/env bash
# Deletes the topics and consumer groups that test and benchmark runs left on
# the test broker: those whose names carry a run id (eight or more hex
# digits; every test and benchmark names what it creates so). Each run adds
# dozens of partitions and groups, and a broker that keeps thousands of them
# holds a large live heap, collects it in longer pauses and slows every
# later run. scripts/test.sh calls this after the suite; run it by hand
# after benchmarks. Best effort: a failure is reported, never fatal. Do not
# run it while tests are running: it deletes their topics too.
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

RUN_ID='.*[0-9a-f]{8}.*'
# A listed name carrying a run id (the tools also print log lines; names
# have no spaces).
NAME_WITH_RUN_ID='^[A-Za-z0-9._-]*[0-9a-f]{8}[A-Za-z0-9._-]*$'

port_open "$KAFKA_PORT" || { log "Kafka is not running: nothing to prune"; exit 0; }
count_topics() { kafka_tool org.apache.kafka.tools.TopicCommand --list 2>/dev/null | grep -cE "$NAME_WITH_RUN_ID"; }
topics=$(count_topics)
if (( topics > 0 )); then
  # Fails harmlessly when a deletion already under way removed them all.
  kafka_tool org.apache.kafka.tools.TopicCommand --delete --topic "$RUN_ID" >/dev/null 2>&1
  left=$(count_topics)
  log "deleted $(( topics - left )) of $topics topics of earlier runs"
fi
mapfile -t groups < <(kafka_tool org.apache.kafka.tools.consumer.group.ConsumerGroupCommand --list 2>/dev/null \
  | grep -E "$NAME_WITH_RUN_ID")
if (( ${#groups[@]} > 0 )); then
  args=()
  for g in "${groups[@]}"; do args+=(--group "$g"); done
  # A group still in use is refused and left alone.
  kafka_tool org.apache.kafka.tools.consumer.group.ConsumerGroupCommand --delete "${args[@]}" >/dev/null 2>&1
  log "deleted the empty ones of ${#groups[@]} consumer groups of earlier runs"
fi
exit 0
