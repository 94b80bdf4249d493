"""Three launches of the fused ROSAQ kernel per Llama-2-7B linear, for Nsight Compute (run on the device machine).

    ncu --clock-control none --set full --import-source no -k regex:_rosaq_linear -c 12 -o prof \\
        python benchmarks/profile_kernel.py --m 1 --bits 4
    ncu -i prof.ncu-rep --page details > details.txt
    ncu -i prof.ncu-rep --page source --csv --print-source sass > source.csv   # for benchmarks/ncu_stalls.py

Each linear (qkv, o, gate_up, down with its block rotation of 128) is built with random codes and 1% salient
channels and called three times, in that order: launches 0-2 are qkv, 3-5 o, 6-8 gate_up, 9-11 down (the first of
each compiles and warms up; read the third).
"""

from __future__ import annotations

import argparse

import torch
from rosaq_kernels.fused_linear import fused_linear, prepare_weights
from rosaq_kernels.packing import pack

SHAPES = {"qkv": (4096, 12288), "o": (4096, 4096), "gate_up": (4096, 22016), "down": (11008, 4096)}
GROUP = 128


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--bits", type=int, default=4, choices=(3, 4))
    ap.add_argument("--config", default=None, help="BM,BN,warps,stages,waves,swap,late (default: the M-bucket table)")
    args = ap.parse_args()
    cfg = tuple(int(v) for v in args.config.split(",")) if args.config else None
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, (K, N) in SHAPES.items():
        S = max(16, round(K * 0.01 / 16) * 16)
        codes = torch.randint(0, 2**args.bits, (N, K), generator=gen, device="cuda")
        scales = (torch.rand(N, K // GROUP, generator=gen, device="cuda") * 0.004 + 0.001).half()
        qzeros = torch.randint(0, 2**args.bits, (N, K // GROUP), generator=gen, device="cuda", dtype=torch.uint8)
        sidx = torch.randperm(K, generator=gen, device="cuda")[:S].to(torch.int32)
        sw = (torch.randn(N, S, generator=gen, device="cuda") * 0.02).half()
        rot = None
        if name == "down":
            rot = torch.linalg.qr(torch.randn(K // 128, 128, 128, generator=gen, device="cuda"))[0]
        p = prepare_weights(pack(codes, args.bits), scales, qzeros, sidx, sw, rot, bits=args.bits, group_size=GROUP)
        x = torch.randn(args.m, K, dtype=torch.float16, device="cuda", generator=gen)
        for _ in range(3):
            fused_linear(x, p, args.bits, GROUP, config=cfg)
        torch.cuda.synchronize()
        print(f"{name}: K={K} N={N} S={S} M={args.m} W{args.bits}", flush=True)


if __name__ == "__main__":
    main()
