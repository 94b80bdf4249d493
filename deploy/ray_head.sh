#!/usr/bin/env bash
# Head of a multi-node rosaq-vllm deployment: start Ray, wait for every node, then serve with vLLM's
# Ray executor (pipeline parallel across nodes x tensor parallel within a node).
#
# Environment (set by deploy/k8s/multi-node/head.yaml):
#   ROSAQ_NODES           nodes in the Ray cluster, head included (e.g. 2)
#   ROSAQ_TP, ROSAQ_PP    tensor- and pipeline-parallel sizes (ROSAQ_TP * ROSAQ_PP GPUs in all)
#   ROSAQ_CHECKPOINT      checkpoint directory (default /models/rosaq)
#   ROSAQ_WAIT_S          how long to wait for the workers (default 900 s)
#   VLLM_API_KEY          API key the server requires (from a Secret)
set -euo pipefail

nodes=${ROSAQ_NODES:?set ROSAQ_NODES}
tp=${ROSAQ_TP:?set ROSAQ_TP}
pp=${ROSAQ_PP:?set ROSAQ_PP}
checkpoint=${ROSAQ_CHECKPOINT:-/models/rosaq}
wait_s=${ROSAQ_WAIT_S:-900}

ray start --head --port=6379 --dashboard-host=127.0.0.1 --disable-usage-stats

alive_nodes() {
  python3 -c 'import ray; ray.init(address="auto", logging_level="ERROR"); print(sum(n["Alive"] for n in ray.nodes()))'
}

deadline=$((SECONDS + wait_s))
until [ "$(alive_nodes)" -ge "$nodes" ]; do
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "rosaq: only $(alive_nodes) of $nodes Ray nodes joined within ${wait_s}s" >&2
    exit 1
  fi
  sleep 5
done
echo "rosaq: $nodes Ray nodes up; serving $checkpoint with TP=$tp PP=$pp"

exec vllm serve "$checkpoint" \
  --served-model-name rosaq \
  --host 0.0.0.0 --port 8000 \
  --tensor-parallel-size "$tp" --pipeline-parallel-size "$pp" \
  --distributed-executor-backend ray
