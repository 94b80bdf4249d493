"""Kernel benchmark: fused ROSAQ W4/W3 vs torch fp16 vs vLLM's Marlin and Machete (W4 g128), one run.

    python benchmarks/bench_kernels.py [--models llama2-7b,llama3-8b] [--ms 1,4,16,...] [--out FILE.md]
    python benchmarks/bench_kernels.py --sweep     # time alternative launch configs of the ROSAQ kernel

Every number is a median of CUDA-event timings of CUDA-graph replays (each graph holds ≥ 20 calls; the
weights rotate among enough copies that the set is ≥ 2× the L2 cache, so weights come from HBM as in a
real forward pass). Per linear and per layer (sum of the four linears): µs, achieved TB/s on the bytes
that must move (weights, scales, zero points, salient weights and indices, rotation, x read once, y
written once), the fraction of the bandwidth floor (bytes / HBM copy bandwidth measured in the same run),
and ratios. Marlin (``apply_gptq_marlin_linear``) and Machete (``machete_mm``) are vLLM 0.26's W4A16
kernels at uint4b8 (GPTQ, symmetric) g128, called as in ``shared/gpu/kernel_anchor.py``; if vLLM cannot
be imported they are skipped and the report says so. ``rosaq-w4-*-machete`` is the ROSAQ op's large-M path
(``rosaq_kernels.machete``: Machete with zero points + the salient ``addmm``), which the op takes from
``MACHETE_MIN_M`` rows on.
"""

from __future__ import annotations

import argparse
import datetime
import math
import statistics
import sys

import torch
import torch.nn.functional as F
import triton
from rosaq_kernels.fused_linear import _CONFIGS, fused_linear, prepare_weights, set_config_table
from rosaq_kernels.machete import MACHETE_MIN_M, machete_linear, machete_weights
from rosaq_kernels.packing import pack

MODELS = {
    "llama2-7b": {"qkv": (4096, 12288), "o": (4096, 4096), "gate_up": (4096, 22016), "down": (11008, 4096)},
    "llama3-8b": {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)},
}
ROT_BLOCK = {"down": 128}  # the quantizer's default: an online block rotation of 128 on down_proj's input
MS = (1, 4, 16, 32, 64, 128, 256, 1024, 4096)
GROUP = 128
SALIENT_FRACS = (0.01, 0.03)
# Anchors (H100, per Llama-2-7B layer, sum of the four linears, µs) and targets from the issue.
ANCHORS = {1: (140.3, 58.6, 84.9, 50), 16: (144.1, 65.1, 85.2, 55), 64: (146.5, 111.3, 98.3, 85),
           256: (195.2, 305.4, 195.1, 195), 1024: (636.7, 1137.4, 616.5, 640)}  # fmt: skip
L2_BYTES = 50 * 2**20


def salient_count(K: int, frac: float) -> int:
    return max(16, round(K * frac / 16) * 16)


# ------------------------------------------------------------------------------------------- timing
def time_graph(calls, n_min: int = 20, reps: int = 12) -> float:
    """Median µs per call of ``calls[i % len(calls)]()`` replayed in a CUDA graph."""
    for c in calls:
        c()
    torch.cuda.synchronize()
    n = len(calls) * math.ceil(n_min / len(calls))
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(n):
            calls[i % len(calls)]()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) * 1e3 / n)
    del g
    return statistics.median(times)


def n_copies(weight_bytes: int) -> int:
    return max(1, min(16, math.ceil(2 * L2_BYTES / weight_bytes)))


def hbm_copy_bandwidth() -> float:
    x = torch.empty(2 * 1024**3 // 2, dtype=torch.float16, device="cuda").normal_()
    y = torch.empty_like(x)
    t = time_graph([lambda x=x, y=y: y.copy_(x)], n_min=10, reps=10)
    del x, y
    return 2 * 2 * 1024**3 / (t * 1e-6) / 1e12


def hbm_read_bandwidth() -> float:
    x = torch.empty(2 * 1024**3 // 2, dtype=torch.float16, device="cuda").normal_()
    out = torch.empty((), dtype=torch.float32, device="cuda")
    t = time_graph([lambda x=x, out=out: torch.sum(x, dim=0, dtype=torch.float32, out=out)], n_min=10, reps=10)
    del x
    return 2 * 1024**3 / (t * 1e-6) / 1e12


def fp16_matmul_rate() -> float:
    a = torch.randn(8192, 8192, dtype=torch.float16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.float16, device="cuda")
    t = time_graph([lambda: a @ b], n_min=10, reps=5)
    return 2 * 8192**3 / (t * 1e-6) / 1e12


# ------------------------------------------------------------------------------------------- layers
def make_rosaq(K, N, bits, S, B, gen):
    """Random ROSAQ layer (salient columns of the codes at the zero point, as the quantizer writes)."""
    codes = torch.randint(0, 2**bits, (N, K), generator=gen, device="cuda")
    scales = (torch.rand(N, K // GROUP, generator=gen, device="cuda") * 0.004 + 0.001).half()
    qzeros = torch.randint(0, 2**bits, (N, K // GROUP), generator=gen, device="cuda", dtype=torch.uint8)
    sidx = torch.randperm(K, generator=gen, device="cuda")[:S].to(torch.int32)
    sw = (torch.randn(N, S, generator=gen, device="cuda") * 0.02).half()
    rot = torch.linalg.qr(torch.randn(K // B, B, B, generator=gen, device="cuda"))[0] if B else None
    qweight = pack(codes, bits)
    del codes
    prepared = prepare_weights(qweight, scales, qzeros, sidx, sw, rot, bits=bits, group_size=GROUP)
    prepared.update(machete_weights(qweight, scales, qzeros, bits, GROUP, torch.float16) or {})
    return prepared


def machete_path(a, p):
    """The op's large-M path (``rosaq_kernels.machete``) on a prepared layer."""
    return machete_linear(a, p["machete_qweight"], p["machete_scales"], p["machete_zeros"], p["salient_idx"],
                          p["salient_weight"], p["rot"], GROUP)


def rosaq_copies(K, N, bits, S, B, gen):
    """A random ROSAQ layer and enough clones of it that cycling through them streams weights from HBM."""
    base = make_rosaq(K, N, bits, S, B, gen)
    copies = [base]
    for _ in range(n_copies(rosaq_bytes(1, K, N, bits, S, B)) - 1):
        copies.append({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in base.items()})
    return copies


def rosaq_bytes(M, K, N, bits, S, B):
    b = N * K * bits // 8 + N * (K // GROUP) * 3 + N * S * 2 + S * 4 + M * K * 2 + M * N * 2
    return b + ((K // B) * B * B * 2 if B else 0)


def w4_bytes(M, K, N):
    return N * K // 2 + N * (K // GROUP) * 2 + M * K * 2 + M * N * 2


def fp16_bytes(M, K, N):
    return N * K * 2 + M * K * 2 + M * N * 2


class VllmKernels:
    """Marlin and Machete W4 (uint4b8) g128 through vLLM, as in shared/gpu/kernel_anchor.py."""

    def __init__(self):
        from vllm import _custom_ops as ops
        from vllm.model_executor.layers.quantization.utils.marlin_utils import (
            apply_gptq_marlin_linear,
            marlin_make_workspace_new,
        )
        from vllm.model_executor.layers.quantization.utils.marlin_utils_test import marlin_quantize
        from vllm.model_executor.layers.quantization.utils.quant_utils import pack_rows, quantize_weights
        from vllm.scalar_type import scalar_types

        self.ops, self.apply_marlin, self.make_ws = ops, apply_gptq_marlin_linear, marlin_make_workspace_new
        self.marlin_quantize, self.pack_rows, self.quantize_weights = (
            marlin_quantize,
            pack_rows,
            quantize_weights,
        )
        self.wt = scalar_types.uint4b8
        import vllm

        self.version = vllm.__version__

    def marlin(self, w):  # w [K, N] fp16
        K, N = w.shape
        _, mq, ms, g_idx, sort_idx, _ = self.marlin_quantize(w, self.wt, GROUP, act_order=False)
        ws = self.make_ws(w.device)
        return lambda a: self.apply_marlin(a, mq, ms, None, g_idx, sort_idx, ws, self.wt, N, K, True)

    def machete(self, w):
        K, N = w.shape
        _, wq, wsc, _ = self.quantize_weights(w, self.wt, GROUP, zero_points=False)
        wq = self.pack_rows(wq, 4, K, N)
        wq_m = self.ops.machete_prepack_B(
            wq.t().contiguous().t(), a_type=w.dtype, b_type=self.wt, group_scales_type=w.dtype
        )
        return lambda a: self.ops.machete_mm(a=a, b_q=wq_m, b_type=self.wt, b_group_scales=wsc, b_group_size=GROUP)


# ------------------------------------------------------------------------------------------- bench
def bench(models, ms, vk, bw, out_lines):
    gen = torch.Generator(device="cuda").manual_seed(0)
    rosaq_methods = [(bits, frac) for bits in (4, 3) for frac in SALIENT_FRACS]
    per_linear = {}  # (model, M, name, method) -> (µs, bytes)
    for model in models:
        for name, (K, N) in MODELS[model].items():
            B = ROT_BLOCK.get(name, 0)
            print(f"# preparing {model} {name} K={K} N={N}", flush=True)
            w = torch.randn(K, N, dtype=torch.float16, device="cuda", generator=gen) / K**0.5
            wl = [w.t().contiguous() for _ in range(n_copies(N * K * 2))]  # [N, K] for F.linear
            fns = {"fp16": [lambda a, W=W: F.linear(a, W) for W in wl]}
            if vk is not None:
                c4 = n_copies(N * K // 2)
                fns["marlin"] = [vk.marlin(w) for _ in range(c4)]
                fns["machete"] = [vk.machete(w) for _ in range(c4)]
            del w
            for bits, frac in rosaq_methods:
                S = salient_count(K, frac)
                copies = rosaq_copies(K, N, bits, S, B, gen)
                fns[f"rosaq-w{bits}-s{round(frac * 100)}"] = [
                    lambda a, p=p, bits=bits: fused_linear(a, p, bits, GROUP) for p in copies
                ]
                if "machete_qweight" in copies[0]:
                    fns[f"rosaq-w{bits}-s{round(frac * 100)}-machete"] = [lambda a, p=p: machete_path(a, p)
                                                                         for p in copies]
            for M in ms:
                a = torch.randn(M, K, dtype=torch.float16, device="cuda", generator=gen)
                for meth, fl in fns.items():
                    t = time_graph([lambda f=f, a=a: f(a) for f in fl])
                    if meth == "fp16":
                        nb = fp16_bytes(M, K, N)
                    elif meth in ("marlin", "machete"):
                        nb = w4_bytes(M, K, N)
                    else:
                        bits = int(meth[7])
                        frac = int(meth.split("-s")[1].split("-")[0]) / 100
                        nb = rosaq_bytes(M, K, N, bits, salient_count(K, frac), B)
                    per_linear[(model, M, name, meth)] = (t, nb)
                    print(
                        f"{model} {name:8s} M={M:5d} {meth:14s} {t:9.1f} us"
                        f"  {nb / (t * 1e-6) / 1e12:5.2f} TB/s"
                        f"  {nb / (bw * 1e12) * 1e6 / t * 100:5.1f}% of BW floor",
                        flush=True,
                    )
            del fns
            torch.cuda.empty_cache()
    # Tables.
    methods = list(dict.fromkeys(key[3] for key in per_linear))  # in the order they were timed
    for model in models:
        names = list(MODELS[model])
        out_lines.append(f"\n### {model}: per layer (sum of {', '.join(names)}), µs\n")
        out_lines.append("| M | " + " | ".join(methods) + " | best ROSAQ vs fp16 | vs Marlin | vs Machete |")
        out_lines.append("|---" * (len(methods) + 4) + "|")
        for M in ms:
            tot = {m: sum(per_linear[(model, M, n, m)][0] for n in names) for m in methods}
            best = min((m for m in methods if m.startswith("rosaq")), key=tot.get)
            cells = [f"{tot[m]:.1f}" for m in methods]
            r = [f"{tot['fp16'] / tot[best]:.2f}× ({best})"]
            for base in ("marlin", "machete"):
                r.append(f"{tot[base] / tot[best]:.2f}×" if base in tot else "skipped")
            out_lines.append(f"| {M} | " + " | ".join(cells) + " | " + " | ".join(r) + " |")
        out_lines.append(
            f"\n### {model}: per layer, achieved TB/s on the bytes that must move (% of the {bw:.2f} TB/s copy floor)\n"
        )
        out_lines.append("| M | " + " | ".join(methods) + " |")
        out_lines.append("|---" * (len(methods) + 1) + "|")
        for M in ms:
            cells = []
            for m in methods:
                t = sum(per_linear[(model, M, n, m)][0] for n in names)
                nb = sum(per_linear[(model, M, n, m)][1] for n in names)
                cells.append(f"{nb / (t * 1e-6) / 1e12:.2f} ({nb / (bw * 1e12) * 1e6 / t * 100:.0f}%)")
            out_lines.append(f"| {M} | " + " | ".join(cells) + " |")
        out_lines.append(f"\n### {model}: per linear, µs\n")
        out_lines.append("| M | linear | " + " | ".join(methods) + " |")
        out_lines.append("|---" * (len(methods) + 2) + "|")
        for M in ms:
            for n in names:
                cells = [f"{per_linear[(model, M, n, m)][0]:.1f}" for m in methods]
                out_lines.append(f"| {M} | {n} | " + " | ".join(cells) + " |")
    if "llama2-7b" in models:
        out_lines.append("\n### Llama-2-7B layer vs the issue's anchors and targets (µs)\n")
        out_lines.append(
            "| M | fp16 (anchor) | Marlin (anchor) | Machete (anchor) | target | best ROSAQ W4 | ROSAQ W4 S 1 % op "
            "| best ROSAQ W3 |"
        )
        out_lines.append("|---|---|---|---|---|---|---|---|")
        names = list(MODELS["llama2-7b"])
        for M in ms:
            if M not in ANCHORS:
                continue
            tot = {m: sum(per_linear[("llama2-7b", M, n, m)][0] for n in names) for m in methods}
            an = ANCHORS[M]
            meas = [f"{tot[m]:.1f} ({a})" for m, a in zip(methods[:3], an[:3], strict=True)]
            if vk is None:
                meas = [meas[0], f"– ({an[1]})", f"– ({an[2]})"]
            w4 = min(tot[m] for m in methods if m.startswith("rosaq-w4"))
            w3 = min(tot["rosaq-w3-s1"], tot["rosaq-w3-s3"])
            op = tot.get("rosaq-w4-s1-machete") if M >= MACHETE_MIN_M else None  # what the op dispatches to
            op = tot["rosaq-w4-s1"] if op is None else op
            out_lines.append(f"| {M} | " + " | ".join(meas) + f" | ≤{an[3]} | {w4:.1f} | {op:.1f} | {w3:.1f} |")
    return per_linear


SWEEP_MS = (1, 16, 64, 256, 1024)


def _sweep_candidates(M, bits):
    """Launch configs ``(BLOCK_M, BLOCK_N, warps, stages, waves, swap, late scale)`` worth timing at this M.

    ``BLOCK_M = 0``: dequantize, then torch.matmul (BLOCK_N and warps of the dequantizing kernel).
    """
    both = [(sw, la) for sw in (0, 1) for la in (0, 1)]
    dense = [(0, bn, 4, 1, 0, 0, 0) for bn in (64, 128)]
    if M == 1:
        fma = [(1, 64, 4, 2, 8, 0, 0), (1, 128, 4, 2, 8, 0, 0)]
        tc = [(16, 64, 4, 3, wv, sw, la) for wv in (4, 8) for sw, la in both]
        more = [(16, 64, 4, 3, 16, 0, la) for la in (0, 1)] + [(16, 64, 2, 3, wv, 0, 1) for wv in (4, 8, 16)]
        return fma + tc + more + [(16, 128, 4, 3, wv, 0, 1) for wv in (4, 8)]
    if M == 32:  # one tile of 32 rows or two of 16
        return [(bm, 64, 4, 3, wv, sw, la) for bm in (16, 32) for wv in (2, 4) for sw, la in both]
    if M == 128:
        tc = [(64, bn, 4, 3, wv, 1, 0) for bn in (64, 128) for wv in (0, 2)]
        return tc + [(128, 128, 8, 3, 0, 1, 0), (128, 64, 4, 3, 0, 1, 0)] + dense[:1]
    if M <= 16:
        tc = [(16, 64, 4, 3, wv, sw, la) for wv in (2, 4, 8) for sw, la in both]
        return tc + [(16, 128, 4, 3, 2, 0, la) for la in (0, 1)] + [(16, 64, 2, 3, wv, 0, 0) for wv in (2, 4)]
    if M <= 64:
        scaled = [(64, bn, 4, st, wv, sw, 0) for bn in (64, 128) for st in (2, 3) for wv in (2, 4) for sw in (0, 1)]
        return scaled + [(64, 64, 4, 3, wv, sw, 1) for wv in (2, 4) for sw in (0, 1)] + dense[:1]
    if M <= 256:
        return [(bm, 128, w, st, 0, 1, 0) for bm in (64, 128) for w in (4, 8) for st in (2, 3)] + dense
    return [(bm, bn, 8, st, 0, 1, 0) for bm in (128, 256) for bn in (128, 256) for st in (2, 3)] + dense


def sweep(out_lines, table_path, sweep_ms=SWEEP_MS):
    """Time candidate launch configs on the Llama-2-7B shapes (S = 1%); write the best M-bucket tables.

    The tables are written when ``sweep_ms`` is the full ``SWEEP_MS`` (other M lists only report timings).
    """
    import json

    gen = torch.Generator(device="cuda").manual_seed(1)
    shapes = MODELS["llama2-7b"]
    out_lines.append("\n### Config sweep (Llama-2-7B shapes, S = 1%), µs per layer (sum of the four linears)\n")
    tables = {}
    for bits in (4, 3):
        layers = {}
        for name, (K, N) in shapes.items():
            S = salient_count(K, 0.01)
            B = ROT_BLOCK.get(name, 0)
            layers[name] = (K, N, rosaq_copies(K, N, bits, S, B, gen))
        totals = {}  # M -> {cfg: µs per layer}
        for M in sweep_ms:
            xs = {
                n: torch.randn(M, K, dtype=torch.float16, device="cuda", generator=gen)
                for n, (K, _, _) in layers.items()
            }
            totals[M] = {}
            for cfg in _sweep_candidates(M, bits):
                try:
                    t = 0.0
                    for n, (_, _, cp) in layers.items():
                        t += time_graph(
                            [lambda p=p, c=cfg, a=xs[n], b=bits: fused_linear(a, p, b, GROUP, config=c)
                             for p in cp], n_min=20, reps=7)  # fmt: skip
                except Exception as exc:  # a config that does not compile (shared memory) is skipped
                    print(f"  skip W{bits} {cfg}: {type(exc).__name__}", flush=True)
                    continue
                totals[M][cfg] = t
            if not totals[M]:
                totals[M] = {next(row[1:] for row in _CONFIGS[bits] if M <= row[0]): float("inf")}
                out_lines.append(f"- W{bits} M={M}: no candidate ran; the current table row is kept")
                continue
            ranked = sorted(totals[M].items(), key=lambda kv: kv[1])
            out_lines.append(
                f"- W{bits} M={M}: "
                + ", ".join(f"{t:.1f} {cfg}" for cfg, t in ranked[:4])
                + f" … worst {ranked[-1][1]:.1f}"
            )
            print(out_lines[-1], flush=True)
        if tuple(sweep_ms) == SWEEP_MS:
            best = {M: min(totals[M], key=totals[M].get) for M in SWEEP_MS}
            tables[bits] = [
                [1, *best[1]],
                [16, *best[16]],
                [32, 32, *best[16][1:]],
                [64, *best[64]],
                [128, *best[64]],
                [256, *best[256]],
                [1 << 62, *best[1024]],
            ]
            out_lines.append(f"- W{bits} table chosen: {tables[bits]}")
            print(out_lines[-1], flush=True)
        del layers
        torch.cuda.empty_cache()
    if table_path and tables:
        with open(table_path, "w") as f:
            json.dump(tables, f)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="llama2-7b,llama3-8b")
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--out", default=None, help="write the markdown report here too")
    ap.add_argument("--sweep", action="store_true", help="time candidate configs, write --table")
    ap.add_argument("--sweep-ms", default=",".join(map(str, SWEEP_MS)), help="M values of --sweep")
    ap.add_argument("--table", default=None, help="JSON M-bucket tables {bits: rows} (written by --sweep)")
    ap.add_argument("--no-vllm", action="store_true", help="skip Marlin and Machete")
    args = ap.parse_args()
    ms = [int(m) for m in args.ms.split(",")]
    models = args.models.split(",")
    lines = []
    vk = None
    vllm_note = "skipped (--no-vllm)"
    if not args.no_vllm:
        try:
            vk = VllmKernels()
            vllm_note = f"vLLM {vk.version}: Marlin (apply_gptq_marlin_linear) and Machete (machete_mm), uint4b8 g128"
        except Exception as exc:
            vllm_note = f"SKIPPED: vLLM not importable ({type(exc).__name__}: {exc})"
    bw = hbm_copy_bandwidth()
    bw_read = hbm_read_bandwidth()
    rate = fp16_matmul_rate()
    lines.append(f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='minutes')}")
    lines.append(
        f"- GPU: {torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).multi_processor_count} SMs)"
    )
    lines.append(f"- torch {torch.__version__}, triton {triton.__version__}; baselines: {vllm_note}")
    lines.append(f"- command: python {' '.join(sys.argv)}")
    lines.append(f"- HBM copy bandwidth (read + write, 2 GiB, this run): {bw:.2f} TB/s (the floor used below)")
    lines.append(f"- HBM read-only bandwidth (fp32 sum of 2 GiB, this run): {bw_read:.2f} TB/s")
    lines.append(f"- fp16 matmul 8192³ (this run): {rate:.0f} TFLOP/s")
    lines.append(
        "- roofline: time ≥ max(bytes that must move / copy bandwidth, 2·M·N·K / fp16 matmul rate); "
        f"the two meet at about {rate * 1e12 / (bw * 1e12):.0f} FLOP/byte"
    )
    print("\n".join(lines), flush=True)
    if args.sweep:
        sweep(lines, args.table, tuple(int(m) for m in args.sweep_ms.split(",")))
    else:
        if args.table:
            import json

            with open(args.table) as f:
                for bits, rows in json.load(f).items():
                    set_config_table(int(bits), rows)
        lines.append(
            f"- ROSAQ launch tables (max M, BM, BN, warps, stages, waves, swap, late scale): {dict(_CONFIGS)}"
        )
        bench(models, ms, vk, bw, lines)
    write_report(lines, args.out)
    return 0


def write_report(lines: list[str], out: str | None) -> None:
    """Print the markdown report, and write it to ``out`` too where given."""
    report = "\n".join(lines)
    print("\n" + report)
    if out:
        with open(out, "w") as f:
            f.write(report + "\n")


if __name__ == "__main__":
    sys.exit(main())
