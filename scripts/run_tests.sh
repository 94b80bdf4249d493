#!/usr/bin/env bash
# The test suite (what CI runs): lint, then every test including the vLLM end-to-end ones.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
PY=.venv/bin/python
"$PY" -m ruff check .
bash scripts/lint_deploy.sh
exec "$PY" -m pytest -q -ra "$@"
