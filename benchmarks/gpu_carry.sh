#!/usr/bin/env bash
# Builds what the accuracy runs need on the lent GPU machine (no network there, 64 MiB per `run` call), split into
# parts of at most 55 MB that are carried one per call, back to back, like the vLLM bundle of ../shared/gpu/README.md.
#
#   usage: benchmarks/gpu_carry.sh qwen|llmc|DIRECTORY OUTDIR [PYTHON_VERSION]   (OUTDIR git-ignored, e.g. .gpu-qwen)
#
#   qwen  the Qwen2.5-Coder-0.5B GGUF and the exllamav3 texts from this machine's asset cache (run
#         `offline_quantizer.assets.qwen_coder_model_dir()` here first), plus the pure-Python `gguf` package that
#         transformers converts the GGUF with. On the device: ROSAQ_CACHE=/root/carry-qwen/cache and
#         PYTHONPATH=/root/carry-qwen/site:... make `eval_accuracy.py --model qwen` work as here.
#   llmc  llm-compressor 0.14.0.1 and what it needs beyond the GPU image (torch 2.11, transformers 5.17, accelerate,
#         pandas there), for Python PYTHON_VERSION (default 3.12, the device's). On the device:
#         `eval_accuracy.py llmc --llmc-python /root/carry-llmc/python`.
#   DIRECTORY  any directory as it is (e.g. a converted model), unpacked to /root/carry-BASENAME.
#
# PART_SIZE (split's -b, default 55M) sets the part size; XZ_LEVEL (default 3) the compression (0 is fast and
# loses little on the qwen bundle, whose GGUF is already quantized). Each part folder pK holds one part, the MANIFEST
# and install.sh; on the device every call runs `bash OUTDIR/pK/install.sh`, and the call that completes the set checks
# the checksums and unpacks to /root/carry-NAME.
set -euo pipefail
usage="usage: gpu_carry.sh qwen|llmc|DIRECTORY OUTDIR [PYTHON_VERSION]"
name=${1:?$usage}
out=${2:?$usage}
pyver=${3:-3.12}
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-$here/../.venv/bin/python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cross=(--only-binary=:all: --python-version "$pyver" --implementation cp --platform manylinux2014_x86_64 --platform any)
for n in 17 24 26 27 28 29 31 32 34 35; do cross+=(--platform "manylinux_2_${n}_x86_64"); done
install_site() {  # install_site DIR REQUIREMENT...: wheels for the device's Python, unpacked without dependencies
  local dir=$1; shift
  "$python" -m pip download -q --no-deps --disable-pip-version-check "${cross[@]}" -d "$work/whl" "$@"
  "$python" -m pip install -q --no-deps --no-compile --disable-pip-version-check "${cross[@]}" --target "$dir" "$work"/whl/*.whl
}
mkdir -p "$work/tree"
case $name in
  qwen)
    cache=${ROSAQ_CACHE:-$HOME/.cache/rosaq-vllm}
    gguf_file="$cache/wheels/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf"
    [ -f "$gguf_file" ] || { echo "no $gguf_file: run offline_quantizer.assets.qwen_coder_model_dir() first" >&2; exit 1; }
    mkdir -p "$work/tree/cache/wheels"
    cp "$gguf_file" "$work/tree/cache/wheels/"
    cp -r "$cache/wheels/exllamav3-1.6.5" "$work/tree/cache/wheels/"
    install_site "$work/tree/site" gguf==0.19.0 ;;
  llmc)
    install_site "$work/tree/site" llmcompressor==0.14.0.1 compressed-tensors==0.19.0 auto-round==0.15.1 \
      datasets==4.8.4 dill==0.4.1 multiprocess==0.70.19 pyarrow==24.0.0 loguru==0.7.3 py-cpuinfo==9.0.0 \
      pydantic==2.14.3 pydantic_core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5
    rm -rf "$work/tree/site/bin" ;;
  *)
    [ -d "$name" ] || { echo "unknown bundle $name (qwen, llmc or a directory)" >&2; exit 2; }
    cp -r "$name"/. "$work/tree/"; name=$(basename "$(cd "$name" && pwd)") ;;
esac
echo "compressing ..."
tar -C "$work/tree" -cf - . | xz -T0 "-${XZ_LEVEL:-3}" > "$work/bundle.tar.xz"
split -b "${PART_SIZE:-55M}" -d -a 2 "$work/bundle.tar.xz" "$work/part-"
( cd "$work" && sha256sum part-* > MANIFEST )
rm -rf "$out"; mkdir -p "$out"
i=0
for p in "$work"/part-*; do
  mkdir -p "$out/p$i"; cp "$p" "$work/MANIFEST" "$out/p$i/"
  sed "s/@NAME@/$name/g" "$here/gpu_carry_install.sh" > "$out/p$i/install.sh"; i=$((i+1))
done
echo "bundle $name ready: $i parts in $out (carry $out/p0 .. $out/p$((i-1)), one per run call, back to back)"
