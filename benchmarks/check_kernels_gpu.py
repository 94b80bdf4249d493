"""GPU correctness of the fused ROSAQ kernel at full Llama-2-7B shapes (run on the device machine).

    python benchmarks/check_kernels_gpu.py [--quick]

For each linear of a Llama-2-7B layer (qkv 4096→12288, o 4096→4096, gate_up 4096→22016, down 11008→4096
with an online block rotation of 128), INT4 and INT3 with 3% salient channels, fp16 and bf16, and
M ∈ {1, 16, 64, 256, 1024, 4096}: fresh random codes, zero points, scales, salient channels and
activations; the output buffer poisoned with NaN; compared with the torch reference in float32
(TF32 off) by ‖y − ref‖ / ‖ref‖. Also: the checkpoint layout through ``torch.ops.rosaq.linear``, and
replay under a CUDA graph with new input data; three dependent launches in one CUDA graph (programmatic
dependent launch on and off); for INT4, the op's Machete path (``rosaq_kernels.machete``)
from ``MACHETE_MIN_M`` rows on, fp16 and bf16, and its CUDA-graph replay. ``--variants`` also checks every
tile orientation × scaling variant (swap, late scale) of the launch configs at M ∈ {1, 16, 64, 256}.
Exits non-zero on any failure.
"""

from __future__ import annotations

import argparse
import sys

import rosaq_kernels.fused_linear as fl
import rosaq_kernels.ops  # noqa: F401  (registers torch.ops.rosaq.linear)
import torch
from rosaq_kernels.fused_linear import fused_linear, prepare_weights
from rosaq_kernels.machete import MACHETE_MIN_M, machete_weights
from rosaq_kernels.packing import pack
from rosaq_kernels.reference import dequantize, rotate_blocks

SHAPES = {"qkv": (4096, 12288), "o": (4096, 4096), "gate_up": (4096, 22016), "down": (11008, 4096)}
ROT_BLOCK = {"down": 128}
MS = (1, 16, 64, 256, 1024, 4096)
TOL = {torch.float16: 3e-3, torch.bfloat16: 1.2e-2}
GROUP = 128


def salient_count(K: int, frac: float) -> int:
    return max(16, round(K * frac / 16) * 16)


def make_layer(K: int, N: int, bits: int, S: int, B: int, gen: torch.Generator, dev="cuda"):
    codes = torch.randint(0, 2**bits, (N, K), generator=gen, device=dev)
    scales = (torch.rand(N, K // GROUP, generator=gen, device=dev) * 0.004 + 0.001).half()
    qzeros = torch.randint(0, 2**bits, (N, K // GROUP), generator=gen, device=dev, dtype=torch.uint8)
    sidx = torch.randperm(K, generator=gen, device=dev)[:S].to(torch.int32)
    codes[:, sidx.long()] = qzeros.repeat_interleave(GROUP, dim=1)[:, sidx.long()].long()  # as the quantizer
    qweight = pack(codes, bits)
    sw = (torch.randn(N, S, generator=gen, device=dev) * 0.02).half()
    rot = None
    if B:
        rot = torch.linalg.qr(torch.randn(K // B, B, B, generator=gen, device=dev))[0]
    return qweight, scales, qzeros, sidx, sw, rot


def reference(x, W, sidx, sw, rot):
    xr = rotate_blocks(x, rot) if rot is not None else x.float()
    return xr @ W.t() + xr[:, sidx.long()] @ sw.float().t()


def variant_configs(M: int) -> list[tuple[int, ...]]:
    """``(BLOCK_M, BLOCK_N, warps, stages, waves, swap, late)`` in every swap × late combination at this M."""
    bm, bn, warps, stages, waves = {1: (16, 64, 4, 3, 4), 16: (16, 64, 4, 3, 2), 64: (64, 64, 4, 2, 2)}.get(
        M, (64, 128, 4, 2, 0)
    )
    return [(bm, bn, warps, stages, waves, swap, late) for swap in (0, 1) for late in (0, 1)]


def rel_err(y, ref):
    return ((y.float() - ref).norm() / ref.norm()).item()


def check_machete(layer, prepared, W, K, N, name, gen) -> list[str]:
    """The op's Machete path (W4, M >= MACHETE_MIN_M): fp16 and bf16, then a CUDA-graph replay on new data."""
    qweight, scales, qzeros, sidx, sw, _ = layer
    failures = []
    for dt in (torch.float16, torch.bfloat16):
        machete = machete_weights(qweight, scales, qzeros, 4, GROUP, dt)
        if machete is None:
            failures.append(f"FAIL W4 {name}: no Machete path on this GPU / vLLM")
            return failures
        rot = None if prepared["rot"] is None else prepared["rot"].to(dt)
        args = [prepared[k] for k in ("qweight", "scales", "qzeros", "salient_idx", "salient_weight")]
        args += [rot, 4, GROUP, True, machete["machete_qweight"], machete["machete_scales"], machete["machete_zeros"]]
        for M in (MACHETE_MIN_M, 256, 1024):
            x = torch.randn(M, K, generator=gen, device="cuda").to(dt)
            y = torch.ops.rosaq.linear(x, *args)
            _judge(f"W4 {name:8s} Machete path M={M:5d} {str(dt)[6:]:8s}", y, reference(x, W, sidx, sw, rot), dt,
                   failures)
        xs = torch.randn(64, K, generator=gen, device="cuda").to(dt)
        torch.ops.rosaq.linear(xs, *args)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = torch.ops.rosaq.linear(xs, *args)
        xs.copy_(torch.randn(64, K, generator=gen, device="cuda"))
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        _judge(f"W4 {name:8s} Machete path CUDA-graph replay M=64 {str(dt)[6:]}", out,
               reference(xs, W, sidx, sw, rot), dt, failures)
    return failures


def check_dependent_chain(prepared, W, sidx, sw, rot_used, bits, K, gen) -> list[str]:
    """Programmatic dependent launch: each kernel must read what the kernel before it wrote.

    One CUDA graph holds a copy into ``x`` (a torch kernel) and then three applications of a square layer, each
    reading the previous output, at M = 1 and 64; the result is compared with the reference chain, and must be
    bitwise equal with PDL off (the kernels are deterministic).
    """
    failures = []
    configured = fl.PDL_ENABLED  # (ROSAQ_PDL), restored for the checks after this one
    for M in (1, 64):
        src = torch.randn(M, K, generator=gen, device="cuda", dtype=torch.float16)
        outs = {}
        for pdl in (True, False):
            fl.PDL_ENABLED = pdl
            x = torch.zeros(M, K, dtype=torch.float16, device="cuda")
            ys = [torch.empty(M, K, dtype=torch.float16, device="cuda") for _ in range(3)]

            def chain(x=x, ys=ys, src=src):
                x.copy_(src)
                fused_linear(x, prepared, bits, GROUP, out=ys[0])
                fused_linear(ys[0], prepared, bits, GROUP, out=ys[1])
                fused_linear(ys[1], prepared, bits, GROUP, out=ys[2])

            chain()  # compile / warm up outside capture
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                chain()
            for y in ys:
                y.fill_(float("nan"))
            x.zero_()
            g.replay()
            torch.cuda.synchronize()
            outs[pdl] = ys[2].clone()
        fl.PDL_ENABLED = configured
        ref = src
        for _ in range(3):
            ref = reference(ref, W, sidx, sw, rot_used).half()
        err = rel_err(outs[True], ref)
        same = torch.equal(outs[True], outs[False])
        ok = err < 3 * TOL[torch.float16] and same and not torch.isnan(outs[True]).any().item()
        line = (f"{'ok ' if ok else 'FAIL'} W{bits} o        three dependent launches in a CUDA graph M={M} "
                f"err={err:.2e} equal without PDL: {same}")  # fmt: skip
        print(line, flush=True)
        if not ok:
            failures.append(line)
    return failures


def _judge(label: str, y: torch.Tensor, ref: torch.Tensor, dt: torch.dtype, failures: list[str]) -> None:
    """Print ``ok``/``FAIL`` with the relative error of ``y`` (no NaN, within ``TOL[dt]``); collect failures."""
    err = rel_err(y, ref)
    ok = err < TOL[dt] and not torch.isnan(y).any().item()
    line = f"{'ok ' if ok else 'FAIL'} {label} err={err:.2e}"
    print(line, flush=True)
    if not ok:
        failures.append(line)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="M in {1, 64, 1024} only")
    ap.add_argument("--variants", action="store_true", help="also every swap × late-scale launch variant")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator(device="cuda").manual_seed(1234)
    ms = (1, 64, 1024) if args.quick else MS
    failures = []
    print(f"GPU {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    for bits in (4, 3):
        for name, (K, N) in SHAPES.items():
            S = salient_count(K, 0.03)
            B = ROT_BLOCK.get(name, 0)
            layer = make_layer(K, N, bits, S, B, gen)
            qweight, scales, qzeros, sidx, sw, _ = layer
            prepared = prepare_weights(*layer, bits=bits, group_size=GROUP)
            rot_used = prepared["rot"]  # fp16-rounded rotation: the logical weight now
            W = dequantize(qweight, scales, qzeros, bits, GROUP)
            runs = [(M, None) for M in ms]
            if args.variants:
                runs += [(M, cfg) for M in (1, 16, 64, 256) for cfg in variant_configs(M)]
            for M, cfg in runs:
                for dt in (torch.float16, torch.bfloat16):
                    x = torch.randn(M, K, generator=gen, device="cuda").to(dt)
                    out = torch.full((M, N), float("nan"), dtype=dt, device="cuda")
                    fused_linear(x, prepared, bits, GROUP, out=out, config=cfg)
                    ref = reference(x, W, sidx, sw, rot_used)
                    err = rel_err(out, ref)
                    nan = torch.isnan(out).any().item()
                    ok = (not nan) and err < TOL[dt]
                    tag = "ok " if ok else "FAIL"
                    line = (
                        f"{tag} W{bits} {name:8s} K={K:5d} N={N:5d} S={S:3d} B={B:3d} M={M:5d} "
                        f"{str(dt)[6:]:8s} err={err:.2e}" + (f" config={cfg}" if cfg else "")
                    )
                    print(line + (" NaN" if nan else ""), flush=True)
                    if not ok:
                        failures.append(line)
            # Checkpoint layout through the custom op (CUDA dispatch in ops.py), with the fp32 rotation.
            M = 16
            x = torch.randn(M, K, generator=gen, device="cuda", dtype=torch.float16)
            y = torch.ops.rosaq.linear(x, *layer, bits, GROUP)
            err = rel_err(y, reference(x, W, sidx, sw, layer[5]))
            ok = err < TOL[torch.float16] and not torch.isnan(y).any().item()
            line = (
                f"{'ok ' if ok else 'FAIL'} W{bits} {name:8s} torch.ops.rosaq.linear, checkpoint layout, "
                f"M=16 err={err:.2e}"
            )
            print(line, flush=True)
            if not ok:
                failures.append(line)
            # The op of the prepared (tile-interleaved) layout, bf16, M=64.
            x = torch.randn(64, K, generator=gen, device="cuda", dtype=torch.bfloat16)
            op_args = [prepared[k] for k in ("qweight", "scales", "qzeros", "salient_idx", "salient_weight", "rot")]
            y = torch.ops.rosaq.linear(x, *op_args, bits, GROUP, True)
            err = rel_err(y, reference(x, W, sidx, sw, rot_used))
            ok = err < TOL[torch.bfloat16] and not torch.isnan(y).any().item()
            line = (
                f"{'ok ' if ok else 'FAIL'} W{bits} {name:8s} torch.ops.rosaq.linear (prepared) M=64 bf16 err={err:.2e}"
            )
            print(line, flush=True)
            if not ok:
                failures.append(line)
            # CUDA graph: capture, then replay on new data.
            for M in (1, 64):
                xs = torch.randn(M, K, generator=gen, device="cuda", dtype=torch.float16)
                out = torch.empty((M, N), dtype=torch.float16, device="cuda")
                fused_linear(xs, prepared, bits, GROUP, out=out)  # compile / warm up outside capture
                torch.cuda.synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    fused_linear(xs, prepared, bits, GROUP, out=out)
                xs.copy_(torch.randn(M, K, generator=gen, device="cuda"))
                out.fill_(float("nan"))
                g.replay()
                torch.cuda.synchronize()
                err = rel_err(out, reference(xs, W, sidx, sw, rot_used))
                ok = err < TOL[torch.float16] and not torch.isnan(out).any().item()
                line = f"{'ok ' if ok else 'FAIL'} W{bits} {name:8s} CUDA-graph replay M={M} err={err:.2e}"
                print(line, flush=True)
                if not ok:
                    failures.append(line)
            if name == "o":
                failures += check_dependent_chain(prepared, W, sidx, sw, rot_used, bits, K, gen)
            if bits == 4:
                failures += check_machete(layer, prepared, W, K, N, name, gen)
            del W, layer, prepared
            torch.cuda.empty_cache()
    print(f"\n{len(failures)} failure(s)")
    for f in failures:
        print("  " + f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
