#!/usr/bin/env bash
# Runs ON the GPU machine from a carried part folder of benchmarks/gpu_carry.sh (@NAME@ is filled in there): stores
# this part under /root, and once all parts are there checks them and unpacks to /root/carry-@NAME@.
set -euo pipefail
src=$(cd "$(dirname "$0")" && pwd)
root=${CARRY_ROOT:-/root}
parts=$root/carry-@NAME@-parts dest=$root/carry-@NAME@
if [ -f "$dest/.ready" ]; then echo "READY (already unpacked): $dest"; exit 0; fi
mkdir -p "$parts"; cp "$src"/part-* "$src/MANIFEST" "$parts/"
stored=("$parts"/part-*); need=$(wc -l < "$parts/MANIFEST")
if [ "${#stored[@]}" -lt "$need" ]; then echo "stored ${src##*/}; have ${#stored[@]} of $need"; exit 0; fi
( cd "$parts" && sha256sum -c --quiet MANIFEST )
mkdir -p "$dest"; cat "$parts"/part-* | xz -d | tar -x -C "$dest"
# a python that sees the bundle's site first (llmc: eval_accuracy.py llmc --llmc-python "$dest/python")
# shellcheck disable=SC2016  # $PYTHONPATH and $@ are the wrapper's, expanded when it runs
printf '#!/bin/sh\nPYTHONPATH="%s/site${PYTHONPATH:+:$PYTHONPATH}" exec python3 "$@"\n' "$dest" > "$dest/python"
chmod +x "$dest/python"; touch "$dest/.ready"; rm -rf "$parts"
echo "READY: $dest (site packages in $dest/site; qwen: ROSAQ_CACHE=$dest/cache)"
