"""Where the time of the Machete path goes: its parts, timed one by one (run on a Hopper GPU with vLLM).

    python benchmarks/bench_machete_parts.py --out parts.md
    python benchmarks/bench_machete_parts.py --schedules --ms 16,64,128,256,1024 --out schedules.md

For the four linears of a Llama-2-7B layer (1 % salient channels; down_proj with its online rotation in blocks of
128) and each M, CUDA-graph medians (``bench_kernels.time_graph``, weights cycled through enough copies to stream
from HBM) of:

- ``machete``: ``machete_mm`` with the zero points (what the path runs; vLLM 0.26 has no ``uint4`` kernel without
  them, ``vllm-machete`` below is ``uint4b8``); ``rotate``: the online block rotation (down_proj);
- ``gather`` + ``addmm``: the salient channels as ``index_select`` + cuBLAS ``addmm`` (the path until 2026-12-04);
  ``salient``: the same as one Triton launch (``rosaq_kernels.salient.salient_addmm_``);
- ``path-addmm`` / ``path``: the whole large-M path with either salient epilogue; ``triton``: the fused kernel;
- ``vllm-machete`` / ``vllm-marlin``: vLLM's own W4 (uint4b8, no zero points, no salient channels) g128 on a random
  weight of the same shape (``bench_kernels.VllmKernels``), the baselines of the same run.

``--schedules``: instead, ``machete`` (with zero points) under each of Machete's schedules
(``machete_supported_schedules``) against its default heuristic (what vLLM and this path use), per linear and M.
"""

from __future__ import annotations

import argparse
import datetime
import sys

import torch
import triton
from bench_kernels import (
    GROUP,
    MODELS,
    ROT_BLOCK,
    VllmKernels,
    n_copies,
    rosaq_copies,
    salient_count,
    time_graph,
    write_report,
)
from rosaq_kernels.fused_linear import block_rotate, fused_linear
from rosaq_kernels.machete import _uint4_id, machete_linear

LAYER = MODELS["llama2-7b"]
MS = (16, 32, 64, 128, 256, 1024, 4096)
#: Launch configs ``(BLOCK_M, BLOCK_N, num_warps)`` of the salient epilogue timed beside its default.
SALIENT_CONFIGS = ((16, 128, 4), (64, 128, 4), (32, 64, 4), (32, 256, 8), (64, 256, 8))


def _machete(x, p, schedule=None):
    return torch.ops._C.machete_mm(
        x, p["machete_qweight"], _uint4_id(), None, p["machete_scales"], p["machete_zeros"], GROUP, None, None, schedule
    )


def schedule_times(p, M, K, gen) -> dict:
    """µs of ``machete_mm`` with zero points at ``M`` rows: ``"default"`` (its heuristic) and every schedule."""
    x = torch.randn(M, K, dtype=torch.float16, device="cuda", generator=gen)
    names = torch.ops._C.machete_supported_schedules(
        torch.float16, _uint4_id(), torch.float16, torch.float16, None, None, None
    )
    times = {"default": time_graph([lambda q=q: _machete(x, q) for q in p])}
    for name in names:
        try:
            times[name] = time_graph([lambda q=q, s=name: _machete(x, q, s) for q in p])
        except RuntimeError:  # a schedule that cannot run this shape
            continue
    return times


def schedule_report(times, ms) -> list[str]:
    """Per M: the layer's sum under the default heuristic and under the best schedule of each linear."""
    lines = [
        "| M | default (µs / layer) | best schedule per linear (µs / layer) | best / default | best schedules "
        "(qkv, o, gate_up, down) |",
        "|---|---|---|---|---|",
    ]
    for M in ms:
        best = {n: min((t, s) for s, t in times[(M, n)].items() if s != "default") for n in LAYER}
        default = sum(times[(M, n)]["default"] for n in LAYER)
        total = sum(t for t, _ in best.values())
        lines.append(
            f"| {M} | {default:.1f} | {total:.1f} | {total / default:.3f} | "
            + ", ".join(f"`{s}` {t:.1f} (default {times[(M, n)]['default']:.1f})" for n, (t, s) in best.items())
            + " |"
        )
    return lines


def _path_addmm(x, p):
    """The large-M path as it was: rotation, Machete, ``index_select`` + ``addmm``."""
    if p["rot"] is not None:
        x = block_rotate(x, p["rot"])
    y = _machete(x, p)
    return y.addmm_(x.index_select(1, p["salient_idx"]), p["salient_weight"].t())


def parts(p, baselines, M, K, N, gen) -> dict:
    """µs of each part for one linear (``p``: the copies of one prepared layer; ``baselines``: name -> copies of
    vLLM's W4 callables) at ``M`` rows."""
    from rosaq_kernels.salient import salient_addmm_

    x = torch.randn(M, K, dtype=torch.float16, device="cuda", generator=gen)
    y = torch.randn(M, N, dtype=torch.float16, device="cuda", generator=gen)
    xs = x.index_select(1, p[0]["salient_idx"])
    fns = {
        "machete": lambda q: _machete(x, q),
        "gather": lambda q: x.index_select(1, q["salient_idx"]),
        "addmm": lambda q: y.addmm_(xs, q["salient_weight"].t()),
        "salient": lambda q: salient_addmm_(y, x, q["salient_idx"], q["salient_weight"]),
        **{
            f"salient-{'x'.join(map(str, c))}": lambda q, c=c: salient_addmm_(
                y, x, q["salient_idx"], q["salient_weight"], c
            )
            for c in SALIENT_CONFIGS
        },
        "path-addmm": lambda q: _path_addmm(x, q),
        "path": lambda q: machete_linear(
            x,
            q["machete_qweight"],
            q["machete_scales"],
            q["machete_zeros"],
            q["salient_idx"],
            q["salient_weight"],
            q["rot"],
            GROUP,
        ),
        "triton": lambda q: fused_linear(x, q, 4, GROUP),
    }
    if p[0]["rot"] is not None:
        fns["rotate"] = lambda q: block_rotate(x, q["rot"])
    times = {name: time_graph([lambda f=f, q=q: f(q) for q in p]) for name, f in fns.items()}
    times.update({name: time_graph([lambda f=f: f(x) for f in fl]) for name, fl in baselines.items()})
    return times


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--out", default=None, help="write the markdown report here too")
    ap.add_argument("--schedules", action="store_true", help="time Machete's schedules instead of the parts")
    args = ap.parse_args()
    import vllm

    ms = [int(m) for m in args.ms.split(",")]
    gen = torch.Generator(device="cuda").manual_seed(0)
    times = {}  # (M, linear) -> {part or schedule: µs}
    header = [
        f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='minutes')}",
        f"- GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}, "
        f"vLLM {vllm.__version__}",
        f"- command: python {' '.join(sys.argv)}",
        "",
    ]
    if args.schedules:
        for name, (K, N) in LAYER.items():
            copies = rosaq_copies(K, N, 4, salient_count(K, 0.01), ROT_BLOCK.get(name, 0), gen)
            for M in ms:
                times[(M, name)] = schedule_times(copies, M, K, gen)
                best = min((t, s) for s, t in times[(M, name)].items() if s != "default")
                print(M, name, f"default {times[(M, name)]['default']:.1f}, best {best[0]:.1f} {best[1]}", flush=True)
            del copies
            torch.cuda.empty_cache()
        write_report(header + schedule_report(times, ms), args.out)
        return 0
    vk = VllmKernels()
    for name, (K, N) in LAYER.items():
        w = torch.randn(K, N, dtype=torch.float16, device="cuda", generator=gen) / K**0.5
        baselines = {
            f"vllm-{kind}": [getattr(vk, kind)(w) for _ in range(n_copies(N * K // 2))]
            for kind in ("machete", "marlin")
        }
        del w
        copies = rosaq_copies(K, N, 4, salient_count(K, 0.01), ROT_BLOCK.get(name, 0), gen)
        if "machete_qweight" not in copies[0]:
            raise SystemExit("no Machete copy of the weights: needs an sm_90 GPU and vLLM's ops")
        for M in ms:
            times[(M, name)] = parts(copies, baselines, M, K, N, gen)
            print(M, name, {k: round(v, 1) for k, v in times[(M, name)].items()}, flush=True)
        del copies, baselines
        torch.cuda.empty_cache()
    cols = [
        "machete",
        "rotate",
        "gather",
        "addmm",
        "salient",
        "path-addmm",
        "path",
        "triton",
        "vllm-machete",
        "vllm-marlin",
    ] + [f"salient-{'x'.join(map(str, c))}" for c in SALIENT_CONFIGS]
    lines = header + [
        "| M | " + " | ".join(cols) + " |",
        "|---" * (len(cols) + 1) + "|",
    ]
    for M in ms:
        tot = {c: sum(times[(M, n)].get(c, 0.0) for n in LAYER) for c in cols}
        lines.append(f"| {M} | " + " | ".join(f"{tot[c]:.1f}" for c in cols) + " |")
    write_report(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
