#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, quantize SmolLM2-135M-Instruct with ROSAQ, serve it with
# vLLM on 127.0.0.1, ask one chat question, print the fp vs ROSAQ perplexity, stop the server.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python scripts/demo.py "$@"
