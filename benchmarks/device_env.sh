# shellcheck shell=bash
# Source on the lent GPU machine, from the repo root, after the vLLM parts are installed
# (shared/gpu/README.md):   source benchmarks/device_env.sh
# Puts vLLM 0.26.0, this checkout and `rosaq_kernels` (the kernels/ directory) on PYTHONPATH and registers
# the plugin's `vllm.general_plugins` entry point through a dist-info directory: on that machine
# `pip install -e .` registered neither (2026-11-23).
_pp=/tmp/rosaq-pp
mkdir -p "$_pp/rosaq_device-0.0.dist-info"
ln -sfn "$PWD/kernels" "$_pp/rosaq_kernels"
printf 'Metadata-Version: 2.1\nName: rosaq-device\nVersion: 0.0\n' > "$_pp/rosaq_device-0.0.dist-info/METADATA"
printf '[vllm.general_plugins]\nrosaq = rosaq_vllm:register\n' > "$_pp/rosaq_device-0.0.dist-info/entry_points.txt"
export PYTHONPATH="/root/gpu-vllm-site:$PWD:$_pp" VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_WORKER_MULTIPROC_METHOD=spawn
unset _pp
