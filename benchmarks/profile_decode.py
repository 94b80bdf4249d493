"""Where a vLLM decode step's GPU time goes, kernel by kernel, per config (issue #6's "profile of the decode step").

Runs on the GPU machine after ``bench_e2e.py build`` / ``quantize`` (same ``--out``, same configs)::

    python benchmarks/profile_decode.py run    --out OUT --configs rosaq-w4 awq-marlin awq --batches 1 64
    python benchmarks/profile_decode.py report --out OUT

Each config runs in a fresh process with the engine in that process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so
``torch.profiler`` sees every kernel, CUDA-graph replays included. Per batch size, after a warm-up:

* wall time of a decode step: ``(t(1 + steps tokens) - t(1 token)) / steps`` of ``llm.generate`` (median of
  ``--repeats``), which cancels the prefill;
* GPU time of a decode step per kernel: the same subtraction on the profiled kernel totals (a profiled
  ``generate`` of ``1 + steps`` tokens minus one of 1 token), divided by ``steps``.

The report groups kernels by :data:`CATEGORIES` (ROSAQ's Triton kernels, vLLM's W4 kernels, dense GEMMs: lm_head and
fp16 linears, attention, torch.compile's fused elementwise kernels, the rest) and lists the largest kernels, in µs
per decode step.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_e2e  # noqa: E402

#: (category, regular expression on the kernel name), first match wins. torch.compile's own Triton kernels come first:
#: their names list the ops they fused, e.g. ``triton_red_fused_fused_add_rms_norm_marlin_gemm_2`` (a norm that feeds
#: a Marlin GEMM).
CATEGORIES = (
    ("norms, activation, rotary (torch.compile)", re.compile(r"^triton_(poi|red|per)_")),
    ("ROSAQ linear (Triton)", re.compile(r"_rosaq_linear_kernel")),
    ("ROSAQ rotation (Triton)", re.compile(r"_block_rotate_kernel")),
    ("ROSAQ salient pass (Triton)", re.compile(r"_salient_addmm_kernel")),
    ("Machete", re.compile(r"machete", re.I)),
    ("Marlin", re.compile(r"marlin", re.I)),
    ("attention (with the KV-cache writes)", re.compile(r"flash|attn|attention|paged|fmha", re.I)),
    ("dense GEMM (cuBLAS / CUTLASS)", re.compile(r"gemm|nvjet|sm90_xmma|cutlass|ampere_|cublas", re.I)),
    ("memset", re.compile(r"^Memset")),
)
OTHER = "other (sampling, input preparation, copies)"


def categorize(kernel: str) -> str:
    """The category of a kernel name (see :data:`CATEGORIES`)."""
    return next((cat for cat, pattern in CATEGORIES if pattern.search(kernel)), OTHER)


def per_step(short: dict[str, list[float]], long: dict[str, list[float]], steps: int) -> dict[str, dict]:
    """Per-decode-step kernel time from two profiles: ``{name: [count, total µs]}`` of a ``generate`` of 1 token
    (``short``: the prefill) and of ``1 + steps`` tokens (``long``).

    Returns ``{name: {"count": launches per step, "us": µs per step}}`` for the kernels with time left after the
    subtraction (a kernel the prefill ran more often than the decode steps can come out slightly negative: kept, so
    that the total stays the difference of the totals).
    """
    out = {}
    for name in sorted(set(short) | set(long)):
        n_long, t_long = long.get(name, (0, 0.0))
        n_short, t_short = short.get(name, (0, 0.0))
        if n_long == n_short and t_long == t_short:
            continue
        out[name] = {"count": (n_long - n_short) / steps, "us": (t_long - t_short) / steps}
    return out


def _kernel_totals(prof) -> dict[str, list[float]]:
    """``{kernel name: [launches, total µs]}`` of the GPU kernels in a finished ``torch.profiler`` run."""
    from torch.autograd import DeviceType

    totals: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type != DeviceType.CUDA:
            continue
        entry = totals.setdefault(event.name, [0, 0.0])
        entry[0] += 1
        entry[1] += event.time_range.elapsed_us()
    return totals


def generate(llm, prompts: list[dict], params) -> float:
    """Seconds of one ``llm.generate`` (it returns once the tokens are on the host)."""
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - start


def worker(args: argparse.Namespace) -> None:
    """One engine, one config (its own process): wall and per-kernel GPU time of a decode step per batch size."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process: the profiler sees its kernels
    import torch
    from torch.profiler import ProfilerActivity, profile
    from vllm import LLM, SamplingParams

    import rosaq_vllm

    rosaq_vllm.register()
    kwargs = json.loads(args.engine)
    llm = LLM(**kwargs)
    vocab = json.loads((Path(kwargs["model"]) / "config.json").read_text())["vocab_size"]
    gen = torch.Generator().manual_seed(0)

    def params(tokens: int) -> SamplingParams:
        return SamplingParams(max_tokens=tokens, min_tokens=tokens, ignore_eos=True, temperature=0.0,
                              detokenize=False)

    rows = []
    for bs in args.batches:
        prompts = bench_e2e.random_prompts(bs, vocab, gen)
        generate(llm, prompts, params(8))  # warm-up
        walls = [(generate(llm, prompts, params(1 + args.steps)) - generate(llm, prompts, params(1))) / args.steps
                 for _ in range(args.repeats)]
        totals = []
        for tokens in (1, 1 + args.steps):
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                generate(llm, prompts, params(tokens))
            totals.append(_kernel_totals(prof))
        kernels = per_step(totals[0], totals[1], args.steps)
        row = {"batch": bs, "steps": args.steps, "wall_ms_per_step": round(statistics.median(walls) * 1e3, 4),
               "wall_ms_per_step_all": [round(w * 1e3, 4) for w in walls],
               "gpu_us_per_step": round(sum(k["us"] for k in kernels.values()), 2), "kernels": kernels}
        print("RESULT", json.dumps({k: v for k, v in row.items() if k != "kernels"}), flush=True)
        rows.append(row)
    Path(args.result).write_text(json.dumps({"config": args.config, "engine": kwargs, "env": json.loads(args.env),
                                             "rows": rows, **bench_e2e._versions()}, indent=2))


def run(args: argparse.Namespace) -> None:
    results = args.out / "results"
    results.mkdir(parents=True, exist_ok=True)
    command = shlex.join([sys.executable, *sys.argv])
    for config in args.configs:
        kwargs, env = bench_e2e._engine_args(args.out, config, 1, args.max_model_len, args.gpu_memory_utilization,
                                             False)
        label = config + args.label
        cmd = [sys.executable, __file__, "worker", "--config", label, "--engine", json.dumps(kwargs),
               "--env", json.dumps(env), "--result", str(results / f"profile-{label}.json"),
               "--steps", str(args.steps), "--repeats", str(args.repeats), "--batches", *map(str, args.batches)]
        print(f"=== {config}: {env}", flush=True)
        proc = subprocess.run(cmd, env={**bench_e2e._env(), **env, "BENCH_E2E_COMMAND": command}, check=False)
        if proc.returncode:
            print(f"!!! {config} failed with exit code {proc.returncode}", flush=True)


def report(args: argparse.Namespace) -> str:
    runs = [json.loads(p.read_text()) for p in sorted((args.out / "results").glob("profile-*.json"))]
    if not runs:
        raise SystemExit(f"no profile-*.json under {args.out / 'results'}: run `profile_decode.py run` first")
    meta = runs[0]
    lines = [f"# Decode step, kernel by kernel ({meta['date']})", "",
             f"GPU: {meta['gpu']}; torch {meta['torch']}, triton {meta['triton']}, vLLM {meta['vllm']}; "
             f"{bench_e2e.PROMPT_LEN}-token prompts, {meta['rows'][0]['steps']} decode steps; µs per decode step "
             "(GPU: kernel durations summed, the 1-token run subtracted).", ""]
    for bs in sorted({row["batch"] for r in runs for row in r["rows"]}):
        cells = {r["config"]: next(row for row in r["rows"] if row["batch"] == bs) for r in runs
                 if any(row["batch"] == bs for row in r["rows"])}
        configs = list(cells)
        lines += [f"## Batch {bs}", "", "| | " + " | ".join(configs) + " |", "|---|" + "---|" * len(configs)]
        lines.append("| wall per step, µs (median) | " + " | ".join(f"{cells[c]['wall_ms_per_step'] * 1e3:.0f}"
                                                           for c in configs) + " |")
        lines.append("| GPU kernels per step, µs | " + " | ".join(f"{cells[c]['gpu_us_per_step']:.0f}" for c in configs)
                     + " |")
        lines.append("| wall minus kernels, µs | " + " | ".join(
            f"{cells[c]['wall_ms_per_step'] * 1e3 - cells[c]['gpu_us_per_step']:.0f}" for c in configs) + " |")
        by_cat = {c: {} for c in configs}
        for c in configs:
            for name, k in cells[c]["kernels"].items():
                entry = by_cat[c].setdefault(categorize(name), [0.0, 0.0])
                entry[0] += k["count"]
                entry[1] += k["us"]
        for cat in [cat for cat, _ in CATEGORIES] + [OTHER]:
            if any(cat in by_cat[c] for c in configs):
                lines.append(f"| {cat} | " + " | ".join(
                    f"{by_cat[c][cat][1]:.0f} ({by_cat[c][cat][0]:.0f} launches)" if cat in by_cat[c] else "–"
                    for c in configs) + " |")
        lines.append("")
        for c in configs:
            top = sorted(cells[c]["kernels"].items(), key=lambda kv: -kv[1]["us"])[: args.top]
            lines += [f"{c}, largest kernels (µs per step, launches per step):", ""]
            lines += [f"    {k['us']:9.1f} {k['count']:6.1f}  {name[:150]}" for name, k in top]
            lines.append("")
    lines += ["Commands:", "", *[f"    {c}" for c in sorted({r.get("command", "") for r in runs} - {""})]]
    text = "\n".join(lines) + "\n"
    (args.out / "profile.md").write_text(text)
    print(text)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", type=Path, required=True, help="bench_e2e.py's directory (model, checkpoints)")
    r.add_argument("--configs", nargs="+", choices=bench_e2e.CONFIGS, default=["rosaq-w4", "awq-marlin", "awq"])
    r.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    r.add_argument("--steps", type=int, default=64, help="decode steps profiled (after the 1-token prefill run)")
    r.add_argument("--repeats", type=int, default=3, help="wall-time measurements per batch size (median)")
    r.add_argument("--label", default="", help="suffix of the configs' names in the results (e.g. '-nopdl' for a run "
                   "under a different environment)")
    r.add_argument("--max-model-len", type=int, default=512)
    r.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    w = sub.add_parser("worker")
    for flag in ("--config", "--engine", "--env", "--result"):
        w.add_argument(flag, required=True)
    w.add_argument("--batches", type=int, nargs="+", required=True)
    w.add_argument("--steps", type=int, required=True)
    w.add_argument("--repeats", type=int, required=True)
    p = sub.add_parser("report")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--top", type=int, default=12, help="largest kernels listed per config and batch size")
    args = parser.parse_args(argv)
    {"run": run, "worker": worker, "report": report}[args.step](args)


if __name__ == "__main__":
    main()
