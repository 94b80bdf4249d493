"""Time the ROSAQ kernel per Llama-2-7B layer (sum of the four linears, S = 1 %) for given launch configs.

    python benchmarks/ab_configs.py --bits 3 [--ms 1,16,32,64,128,256] [--candidates] [--extra 'CFG;CFG'] [--no-pdl]

Prints, per M, the M-bucket table's config and (``--candidates``) the fastest of a short list of
alternatives, with the per-linear µs (qkv / o / gate_up / down). For A/B runs between two trees, run it
once per tree with ``PYTHONPATH`` pointing at that tree's ``rosaq_kernels``: timings use
``bench_kernels.time_graph`` (CUDA-graph replays, weights rotating through more than 2× the L2 cache).
"""

from __future__ import annotations

import argparse

import bench_kernels as bk
import rosaq_kernels.fused_linear as fl
import torch
from rosaq_kernels.fused_linear import _CONFIGS, fused_linear

_TC16 = [(16, 64, 4, 3, waves, sw, la) for waves in (4, 8) for sw in (0, 1) for la in (0, 1)]
#: Alternatives to the table row, by M: (BLOCK_M, BLOCK_N, warps, stages, split-K waves, swap, late scale).
CANDIDATES = {
    1: [(1, 64, 4, 2, 8, 0, 0), (1, 128, 4, 2, 8, 0, 0)] + _TC16,
    16: _TC16,
    32: [(32, 64, 4, st, 4, 1, la) for st in (2, 3) for la in (0, 1)],
    64: [(64, 64, 4, st, wv, 1, 0) for st in (2, 3) for wv in (2, 4)] + [(64, 64, 4, 3, 4, 1, 1)],
    128: [(64, 64, 4, st, 2, 1, 0) for st in (2, 3)] + [(0, 64, 4, 1, 0, 0, 0)],
}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--ms", default="1,16,32,64,128,256")
    ap.add_argument("--candidates", action="store_true", help="also time the CANDIDATES of each M")
    ap.add_argument("--extra", default="", help="more configs for every M: 'bm,bn,warps,stages,waves,swap,late;...'")
    ap.add_argument("--no-pdl", action="store_true", help="launch without programmatic dependent launch")
    args = ap.parse_args()
    fl.PDL_ENABLED = not args.no_pdl
    extra = [tuple(int(v) for v in c.split(",")) for c in args.extra.split(";") if c]
    bits = args.bits
    gen = torch.Generator(device="cuda").manual_seed(1)
    layers = {}
    for name, (K, N) in bk.MODELS["llama2-7b"].items():
        layers[name] = bk.rosaq_copies(K, N, bits, bk.salient_count(K, 0.01), bk.ROT_BLOCK.get(name, 0), gen)
    for M in (int(m) for m in args.ms.split(",")):
        xs = {n: torch.randn(M, bk.MODELS["llama2-7b"][n][0], dtype=torch.float16, device="cuda", generator=gen)
              for n in layers}  # fmt: skip
        table = next(row[1:] for row in _CONFIGS[bits] if M <= row[0])
        results = []
        for cfg in [table] + (CANDIDATES.get(M, []) if args.candidates else []) + extra:
            try:
                per = [
                    bk.time_graph(
                        [lambda p=p, c=cfg, a=xs[n]: fused_linear(a, p, bits, bk.GROUP, config=c) for p in cps],
                        n_min=20, reps=7,
                    )  # fmt: skip
                    for n, cps in layers.items()
                ]
            except Exception as exc:  # a config that does not fit (shared memory) is skipped
                print(f"skip {cfg}: {type(exc).__name__}", flush=True)
                continue
            results.append((sum(per), cfg, per))
        results.sort()
        best = ", ".join(f"{t:.1f} {c} [{'/'.join(f'{x:.1f}' for x in p)}]" for t, c, p in results)
        print(f"W{bits} M={M}: table {table} | by time: {best}", flush=True)


if __name__ == "__main__":
    main()
