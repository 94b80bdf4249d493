"""What down_proj's online block rotation costs: the rotation launch alone, and the layer with and without it.

    python benchmarks/rotation_cost.py [--bits 4] [--ms 1,16] [--rot-configs 'BM,BI,BJ;...']

Llama-2-7B down_proj (11008 → 4096), S = 1 %, block 128 as the quantizer writes; CUDA-graph medians over
copies of the weights that stream from HBM (``bench_kernels.time_graph``), with and without programmatic
dependent launch; ``--rot-configs`` also times the rotation launch with other tiles (``block_rotate``'s
``config``), alone and followed by the layer's fused kernel.
"""

from __future__ import annotations

import argparse

import bench_kernels as bk
import rosaq_kernels.fused_linear as fl
import torch


def _time(copies: list[dict], fn) -> float:
    """Median µs of ``fn(layer)`` over the weight copies (CUDA graph)."""
    return bk.time_graph([lambda p=p: fn(p) for p in copies], n_min=20, reps=7)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--ms", default="1,16")
    ap.add_argument("--rot-configs", default="", help="rotation tiles to time: 'BLOCK_M,BLOCK_I,BLOCK_J;...'")
    args = ap.parse_args()
    rot_configs = [tuple(int(v) for v in c.split(",")) for c in args.rot_configs.split(";") if c]
    gen = torch.Generator(device="cuda").manual_seed(1)
    K, N = bk.MODELS["llama2-7b"]["down"]
    copies = bk.rosaq_copies(K, N, args.bits, bk.salient_count(K, 0.01), bk.ROT_BLOCK["down"], gen)
    for pdl in (True, False):
        fl.PDL_ENABLED = pdl
        for M in (int(m) for m in args.ms.split(",")):
            x = torch.randn(M, K, dtype=torch.float16, device="cuda", generator=gen)
            rotation = _time(copies, lambda p, x=x: fl.block_rotate(x, p["rot"]))
            with_rot = _time(copies, lambda p, x=x: fl.fused_linear(x, p, args.bits, bk.GROUP))
            without_rot = _time(copies, lambda p, x=x: fl.fused_linear(x, p | {"rot": None}, args.bits, bk.GROUP))
            print(f"pdl={pdl} M={M}: rotation alone {rotation:.1f}  down with rot {with_rot:.1f}  "
                  f"without rot {without_rot:.1f}", flush=True)  # fmt: skip
            for cfg in rot_configs if pdl else []:
                alone = _time(copies, lambda p, x=x, c=cfg: fl.block_rotate(x, p["rot"], c))
                layer = _time(
                    copies,
                    lambda p, x=x, c=cfg: fl.fused_linear(fl.block_rotate(x, p["rot"], c), p | {"rot": None},
                                                          args.bits, bk.GROUP),
                )  # fmt: skip
                print(f"    rotation tiles {cfg}: alone {alone:.1f}  down with rot {layer:.1f}", flush=True)


if __name__ == "__main__":
    main()
