"""Time each Llama-2-7B linear at every reachable split-K count (ROSAQ kernel, S = 1 %), against the table's.

    python benchmarks/sweep_splits.py [--bits 4] [--ms 1,16]

For each linear and M: the table's split, then every split count the K loop can take (``steps per split``
from 1 to all), with the number of programs and their wave efficiency ``P / (ceil(P / slots) · slots)`` for
``slots`` = 4 and 8 resident programs per SM. Timings as ``ab_configs.py`` (CUDA-graph replays, rotating
weight copies). Evidence for the split rule of ``fused_linear._pick_config``.
"""

from __future__ import annotations

import argparse
import math

import bench_kernels as bk
import rosaq_kernels.fused_linear as fl
import torch
import triton

_pick_config = fl._pick_config
_FORCED_STEPS: list[int | None] = [None]


def _forced_pick(*args, **kwargs):
    bm, bn, warps, stages, swap, late, k_tiles, tps, steps, split = _pick_config(*args, **kwargs)
    if _FORCED_STEPS[0] is not None:
        steps = _FORCED_STEPS[0]
        split = triton.cdiv(triton.cdiv(k_tiles, tps), steps)
    return bm, bn, warps, stages, swap, late, k_tiles, tps, steps, split


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--ms", default="1,16")
    args = ap.parse_args()
    bits = args.bits
    fl._pick_config = _forced_pick
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    gen = torch.Generator(device="cuda").manual_seed(1)
    for name, (K, N) in bk.MODELS["llama2-7b"].items():
        copies = bk.rosaq_copies(K, N, bits, bk.salient_count(K, 0.01), bk.ROT_BLOCK.get(name, 0), gen)
        for M in (int(m) for m in args.ms.split(",")):
            x = torch.randn(M, K, dtype=torch.float16, device="cuda", generator=gen)
            _FORCED_STEPS[0] = None
            bm, bn, _, _, _, _, k_tiles, tps, table_steps, table_split = _pick_config(M, N, K, bits, bk.GROUP, x.device)
            k_steps = triton.cdiv(k_tiles, tps)
            tiles = triton.cdiv(M, max(bm, 1)) * triton.cdiv(N, bn)
            seen = set()
            rows = []
            for steps in [None] + list(range(1, k_steps + 1)):
                split = table_split if steps is None else triton.cdiv(k_steps, steps)
                if steps is not None:
                    steps = triton.cdiv(k_steps, split)  # the same split with its fewest steps
                    if split in seen:
                        continue
                    seen.add(split)
                _FORCED_STEPS[0] = steps
                t = bk.time_graph(
                    [lambda p=p, a=x: fl.fused_linear(a, p, bits, bk.GROUP) for p in copies], n_min=20, reps=7
                )
                programs = tiles * split
                eff = [programs / (math.ceil(programs / (s * sms)) * s * sms) for s in (4, 8)]
                tag = "table" if steps is None else f"steps {steps}"
                rows.append(
                    f"{name:8s} M={M:<3d} {tag:9s} split {split:3d} programs {programs:5d} "
                    f"eff4 {eff[0]:.2f} eff8 {eff[1]:.2f}  {t:7.2f} us"
                )
            _FORCED_STEPS[0] = None
            print("\n".join(rows), flush=True)


if __name__ == "__main__":
    main()
