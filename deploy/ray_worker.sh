#!/usr/bin/env bash
# Worker of a multi-node rosaq-vllm deployment: join the head's Ray cluster and stay in the foreground.
#
# Environment (set by deploy/k8s/multi-node/workers.yaml):
#   ROSAQ_RAY_HEAD   address of the head's Ray GCS, host:port (e.g. rosaq-head-0.rosaq-head:6379)
set -euo pipefail

head=${ROSAQ_RAY_HEAD:?set ROSAQ_RAY_HEAD}
host=${head%:*}

for _ in $(seq 1 180); do  # the head pod may start after this one: wait up to 15 minutes for its name
  if getent hosts "$host" >/dev/null; then
    break
  fi
  sleep 5
done

exec ray start --address="$head" --block --disable-usage-stats
