"""End-to-end serving benchmark (issue #6): fp16 vs AWQ (Machete, Marlin) vs ROSAQ W4/W3 inside vLLM.

Steps (each fits in one 10-minute GPU command; results accumulate in ``--out``):

    python benchmarks/bench_e2e.py build    --out OUT [--shape llama2-7b|llama3-8b] [--num-layers N]
    python benchmarks/bench_e2e.py quantize --out OUT --bits 4 [--device cuda] [--no-online-rotation]  # and --bits 3
    python benchmarks/bench_e2e.py offline  --out OUT --configs fp16 [--batches 1 16 64 256] [--repeats 3] [--tp 1]
    python benchmarks/bench_e2e.py online   --out OUT --config rosaq-w4 [--requests 64]
    python benchmarks/bench_e2e.py report   --out OUT

Configs: ``fp16``, ``awq`` (vLLM's default kernel, Machete on H100), ``awq-marlin``
(``VLLM_DISABLED_KERNELS=MacheteLinearKernel``), ``rosaq-w4``, ``rosaq-w4-triton`` (the same checkpoint with
``ROSAQ_MACHETE=0``: the fused Triton kernel at every M), ``rosaq-w4-norot`` (made by ``quantize --bits 4
--no-online-rotation``: down_proj keeps its original basis, no rotation launch), ``rosaq-w3``. fp16 and AWQ use
``load_format="dummy"`` (random weights; fine for timing); ROSAQ serves the checkpoints made by ``quantize``.
Every config runs in a fresh subprocess. Prompts are random token ids (the tokenizer is a tiny offline one).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parent.parent
SHAPES = {
    "llama2-7b": {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "rope_theta": 10000.0,
    },
    "llama3-8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "rope_theta": 500000.0,
    },
    "tiny": {
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "vocab_size": 1024,
        "rope_theta": 10000.0,
    },
}
CONFIGS = ("fp16", "awq", "awq-marlin", "rosaq-w4", "rosaq-w4-triton", "rosaq-w4-norot", "rosaq-w3")
AWQ_QCFG = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}
PROMPT_LEN, GEN_LEN = 128, 256


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


# ---------------------------------------------------------------- build
def build_model(out: Path, shape: str, num_layers: int | None = None, hidden: int | None = None, seed: int = 0) -> Path:
    """A random fp16 LlamaForCausalLM (normal std 0.02, norms 1), written one layer per shard, plus a tokenizer."""
    import torch
    from safetensors.torch import save_file

    from tests.tiny_models import train_tokenizer

    dims = dict(SHAPES[shape])
    if num_layers:
        dims["num_hidden_layers"] = num_layers
    if hidden:
        dims["hidden_size"], dims["intermediate_size"] = hidden, 2 * hidden
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(out)
    tokenizer.model_max_length = 4096
    tokenizer.save_pretrained(out)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **dims,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "dtype": "float16",
        "torch_dtype": "float16",
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    }
    h, inter, v = dims["hidden_size"], dims["intermediate_size"], dims["vocab_size"]
    head_dim = h // dims["num_attention_heads"]
    kv = dims["num_key_value_heads"] * head_dim
    gen = torch.Generator().manual_seed(seed)

    def rand(*size: int) -> torch.Tensor:
        t = (torch.randn(*size, generator=gen) * 0.02).to(torch.float16)
        return t.masked_fill_(t == 0, 0.02)  # no exact zeros (fp16 underflow of tiny draws)

    shards: list[dict[str, torch.Tensor]] = [{"model.embed_tokens.weight": rand(v, h)}]
    for i in range(dims["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shards.append(
            {
                p + "self_attn.q_proj.weight": rand(h, h),
                p + "self_attn.k_proj.weight": rand(kv, h),
                p + "self_attn.v_proj.weight": rand(kv, h),
                p + "self_attn.o_proj.weight": rand(h, h),
                p + "mlp.gate_proj.weight": rand(inter, h),
                p + "mlp.up_proj.weight": rand(inter, h),
                p + "mlp.down_proj.weight": rand(h, inter),
                p + "input_layernorm.weight": torch.ones(h, dtype=torch.float16),
                p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.float16),
            }
        )
    shards.append({"model.norm.weight": torch.ones(h, dtype=torch.float16), "lm_head.weight": rand(v, h)})
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / name, metadata={"format": "pt"})
        for key, tensor in shard.items():
            weight_map[key] = name
            total += tensor.numel() * tensor.element_size()
        shards[k] = {}  # free: one layer in memory at a time
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id})
    )
    return out


def _dummy_dir(out: Path, qcfg: dict | None) -> Path:
    """A config-only directory (``load_format="dummy"``) with the model's config and optional quantization."""
    target = out / ("awq-config" if qcfg else "fp16-config")
    target.mkdir(exist_ok=True)
    config = json.loads((out / "model" / "config.json").read_text())
    if qcfg:
        config["quantization_config"] = qcfg
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target


def quantize(out: Path, bits: int, device: str, num_samples: int, seq_len: int, salient: float,
             extra_args: tuple[str, ...] = (), online_rotation: bool = True) -> dict:
    """ROSAQ checkpoint of ``out/model`` via the CLI (subprocess); records wall time and peak device memory.

    Written to ``out/rosaq-w{bits}``, or ``out/rosaq-w{bits}-norot`` without the online rotation
    (``--no-online-rotation``). ``extra_args``: more ``rosaq-quantize`` flags (e.g. ``--gptq --act-order``).
    """
    name = f"rosaq-w{bits}" + ("" if online_rotation else "-norot")
    from tests.tiny_models import calibration_corpus

    calib = out / "calibration.txt"
    text = calibration_corpus(n_sentences=max(1000, num_samples * seq_len // 8))
    calib.write_text(text)
    ckpt = out / name
    cmd = [
        sys.executable,
        "-m",
        "offline_quantizer",
        str(out / "model"),
        str(ckpt),
        "--bits",
        str(bits),
        "--group-size",
        "128",
        "--salient",
        str(salient),
        "--calib",
        str(calib),
        "--num-samples",
        str(num_samples),
        "--seq-len",
        str(seq_len),
        "--batch-size",
        "4",
        "--device",
        device,
        "--overwrite",
        *extra_args,
        *(() if online_rotation else ("--no-online-rotation",)),
    ]
    print("+", shlex.join(cmd), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=_env(), stdout=subprocess.PIPE, text=True, check=True)
    elapsed = time.perf_counter() - start
    print(proc.stdout, flush=True)
    report = next((line for line in proc.stdout.splitlines() if line.startswith("rosaq-quantize:")), "")
    peak = None
    if "bytes, torch.cuda.max_memory_allocated" in report:
        peak = int(report.split("(")[1].split(" bytes")[0])
    result = {
        "config": name,
        "quantize_s": round(elapsed, 1),
        "peak_device_bytes": peak,
        "device": device,
        "num_samples": num_samples,
        "seq_len": seq_len,
        "salient": salient,
        "extra_args": list(extra_args),
        "cli": report,
    }
    (out / "results").mkdir(exist_ok=True)
    (out / "results" / f"quantize-{name.removeprefix('rosaq-')}.json").write_text(json.dumps(result, indent=2))
    return result


# ---------------------------------------------------------------- offline throughput
def _engine_args(out: Path, config: str, tp: int, max_len: int, gpu_util: float, eager: bool) -> tuple[dict, dict]:
    """(``vllm.LLM`` keyword arguments, extra environment) of a config."""
    env: dict[str, str] = {}
    kwargs = {
        "dtype": "float16",
        "max_model_len": max_len,
        "gpu_memory_utilization": gpu_util,
        "tensor_parallel_size": tp,
        "enforce_eager": eager,
        "skip_tokenizer_init": True,
        "max_num_seqs": 256,
    }
    if config == "fp16":
        kwargs.update(model=str(_dummy_dir(out, None)), load_format="dummy")
    elif config in ("awq", "awq-marlin"):
        kwargs.update(model=str(_dummy_dir(out, AWQ_QCFG)), load_format="dummy")
        if config == "awq-marlin":
            env["VLLM_DISABLED_KERNELS"] = "MacheteLinearKernel"
    elif config.startswith("rosaq-"):
        kwargs.update(model=str(out / config.removesuffix("-triton")), quantization="rosaq")
        if config.endswith("-triton"):  # the fused Triton kernel at every M (no Machete copy for large M)
            env["ROSAQ_MACHETE"] = "0"
    else:
        raise ValueError(f"unknown config {config!r}; choose from {CONFIGS}")
    return kwargs, env


def random_prompts(n: int, vocab: int, gen: torch.Generator) -> list[dict]:
    """``n`` prompts of :data:`PROMPT_LEN` random token ids (away from the vocabulary's ends), as ``llm.generate``
    takes them; drawn from ``gen`` (a CPU generator) so every config sees the same prompts."""
    import torch

    return [{"prompt_token_ids": torch.randint(10, vocab - 10, (PROMPT_LEN,), generator=gen).tolist()}
            for _ in range(n)]


def worker(args: argparse.Namespace) -> None:
    """One engine, one config (runs in its own process): generated tokens/s per batch size."""
    import torch
    from vllm import LLM, SamplingParams

    import rosaq_vllm

    rosaq_vllm.register()
    kwargs = json.loads(args.engine)
    start = time.perf_counter()
    llm = LLM(**kwargs)
    startup = time.perf_counter() - start
    vocab = json.loads((Path(kwargs["model"]) / "config.json").read_text())["vocab_size"]
    gen = torch.Generator().manual_seed(0)
    rows = []
    for bs in args.batches:
        prompts = random_prompts(bs, vocab, gen)
        sp = SamplingParams(
            max_tokens=args.gen_len, min_tokens=args.gen_len, ignore_eos=True, temperature=0.0, detokenize=False
        )
        llm.generate(
            prompts[: min(bs, 4)], SamplingParams(max_tokens=8, ignore_eos=True, detokenize=False), use_tqdm=False
        )  # warm-up
        seconds = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            outs = llm.generate(prompts, sp, use_tqdm=False)
            seconds.append(time.perf_counter() - t)
        n = sum(len(o.outputs[0].token_ids) for o in outs)
        dt = statistics.median(seconds)
        row = {
            "batch": bs,
            "gen_tokens": n,
            "seconds": round(dt, 3),
            "tok_per_s": round(n / dt, 1),
            "tok_per_s_samples": [round(n / s, 1) for s in seconds],
        }
        print("RESULT", json.dumps(row), flush=True)
        rows.append(row)
    Path(args.result).write_text(
        json.dumps(
            {
                "config": args.config,
                "engine": kwargs,
                "env": json.loads(args.env),
                "startup_s": round(startup, 1),
                "rows": rows,
                **_versions(),
            },
            indent=2,
        )
    )


def offline(args: argparse.Namespace) -> None:
    (args.out / "results").mkdir(parents=True, exist_ok=True)
    for config in args.configs:
        if config.startswith("awq") and not _has_cuda():
            print(f"SKIP {config}: vLLM's AWQ kernels need a CUDA GPU", flush=True)
            continue
        kwargs, env = _engine_args(
            args.out, config, args.tp, args.max_model_len, args.gpu_memory_utilization, args.enforce_eager
        )
        result = args.out / "results" / f"offline-{config}-tp{args.tp}.json"
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "_worker",
            "--config",
            config,
            "--engine",
            json.dumps(kwargs),
            "--env",
            json.dumps(env),
            "--result",
            str(result),
            "--gen-len",
            str(args.gen_len),
            "--repeats",
            str(args.repeats),
            "--batches",
            *map(str, args.batches),
        ]
        print(f"=== {config}: {' '.join(f'{k}={v}' for k, v in env.items())} {kwargs}", flush=True)
        command = shlex.join(["python", "benchmarks/bench_e2e.py", *sys.argv[1:]])
        proc = subprocess.run(cmd, env={**_env(), **env, "BENCH_E2E_COMMAND": command}, check=False)
        if proc.returncode:
            print(f"FAILED {config} (exit {proc.returncode})", flush=True)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _versions() -> dict:
    import torch

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
        "command": os.environ.get("BENCH_E2E_COMMAND") or shlex.join([sys.executable, *sys.argv]),
    }
    for module in ("vllm", "triton", "transformers"):
        try:
            info[module] = __import__(module).__version__
        except Exception:  # noqa: BLE001 - missing or broken optional module
            info[module] = None
    return info


# ---------------------------------------------------------------- online latency
def online(args: argparse.Namespace) -> None:
    """OpenAI server on one config; N concurrent streaming completions; TTFT and TPOT percentiles."""
    import asyncio

    import numpy as np

    sys.path.insert(0, str(REPO))  # the repo's tests/ package
    from tests.vllm_server import free_port, running_server

    kwargs, env = _engine_args(
        args.out, args.config, args.tp, args.max_model_len, args.gpu_memory_utilization, args.enforce_eager
    )
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        kwargs["model"],
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--served-model-name",
        "bench",
        "--dtype",
        "float16",
        "--max-model-len",
        str(args.max_model_len),
        "--gpu-memory-utilization",
        str(args.gpu_memory_utilization),
        "--tensor-parallel-size",
        str(args.tp),
        "--skip-tokenizer-init",
        "--max-num-seqs",
        "256",
    ]
    if "load_format" in kwargs:
        cmd += ["--load-format", kwargs["load_format"]]
    if "quantization" in kwargs:
        cmd += ["--quantization", kwargs["quantization"]]
    if args.enforce_eager:
        cmd.append("--enforce-eager")
    (args.out / "results").mkdir(parents=True, exist_ok=True)
    log_path = args.out / "results" / f"server-{args.config}.log"
    with running_server(cmd, port, log_path, {**_env(), **env}, args.startup_timeout):
        vocab = json.loads((Path(kwargs["model"]) / "config.json").read_text())["vocab_size"]
        results = asyncio.run(_load(port, args.requests, args.gen_len, vocab))
    ttft = np.array([r["ttft"] for r in results]) * 1000
    tpot = np.array([r["tpot"] for r in results if r["tpot"] is not None]) * 1000
    summary = {
        "config": args.config,
        "requests": args.requests,
        "prompt_len": PROMPT_LEN,
        "gen_len": args.gen_len,
        "output_tokens": int(sum(r["tokens"] for r in results)),
        **{f"ttft_ms_p{p}": round(float(np.percentile(ttft, p)), 2) for p in (50, 90, 99)},
        **{f"tpot_ms_p{p}": round(float(np.percentile(tpot, p)), 2) for p in (50, 90, 99)},
        "env": env,
        **_versions(),
    }
    print("RESULT", json.dumps(summary), flush=True)
    (args.out / "results" / f"online-{args.config}-tp{args.tp}.json").write_text(json.dumps(summary, indent=2))


async def _load(port: int, n: int, gen_len: int, vocab: int) -> list[dict]:
    """``n`` concurrent streaming completions; per request: TTFT, TPOT (s) and output tokens."""
    import asyncio
    import random

    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=600)
    rng = random.Random(0)
    prompts = [[rng.randrange(10, vocab - 10) for _ in range(PROMPT_LEN)] for _ in range(n)]

    async def one(prompt: list[int]) -> dict:
        start = time.perf_counter()
        stamps, tokens = [], 0
        stream = await client.completions.create(
            model="bench",
            prompt=prompt,
            max_tokens=gen_len,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True, "min_tokens": gen_len, "return_token_ids": True},
        )
        async for chunk in stream:
            ids = getattr(chunk.choices[0], "token_ids", None) if chunk.choices else None
            count = len(ids) if ids else (1 if chunk.choices else 0)
            if count:
                stamps.append(time.perf_counter())
                tokens += count
        ttft = stamps[0] - start
        tpot = (stamps[-1] - stamps[0]) / (tokens - 1) if tokens > 1 else None
        return {"ttft": ttft, "tpot": tpot, "tokens": tokens}

    return await asyncio.gather(*(one(p) for p in prompts))


# ---------------------------------------------------------------- report
def report(args: argparse.Namespace) -> str:
    results = args.out / "results"
    runs = {}
    for path in sorted(results.glob("offline-*.json")):
        data = json.loads(path.read_text())
        tp = data["engine"].get("tensor_parallel_size", 1)
        runs[(data["config"], tp)] = data
    batches = sorted({row["batch"] for d in runs.values() for row in d["rows"]})
    lines = []
    meta = next(iter(runs.values()), None)
    if meta:
        lines += [
            f"# End-to-end vLLM throughput ({meta['date']})",
            "",
            f"GPU: {meta['gpu']}; torch {meta['torch']}, triton {meta['triton']}, vLLM {meta['vllm']}; "
            f"{PROMPT_LEN} prompt + {meta['rows'][0]['gen_tokens'] // max(meta['rows'][0]['batch'], 1)} "
            "generated tokens, greedy, ignore_eos; generated tok/s (median wall time of llm.generate after warm-up).",
            "",
        ]
    header = "| config | TP | " + " | ".join(f"bs {b}" for b in batches) + " |"
    lines += [header, "|" + "---|" * (2 + len(batches))]
    table = {key: {row["batch"]: row["tok_per_s"] for row in d["rows"]} for key, d in runs.items()}
    for (config, tp), cells in sorted(
        table.items(), key=lambda kv: (kv[0][1], CONFIGS.index(kv[0][0]) if kv[0][0] in CONFIGS else 99)
    ):
        fp16 = table.get(("fp16", tp), {})
        awq = [table.get((c, tp), {}) for c in ("awq", "awq-marlin")]
        out = []
        for b in batches:
            if b not in cells:
                out.append("–")
                continue
            cell = f"{cells[b]:.1f}"
            if config != "fp16" and b in fp16:
                cell += f" ({cells[b] / fp16[b]:.2f}× fp16"
                best = max((a[b] for a in awq if b in a), default=None)
                if config.startswith("rosaq") and best:
                    cell += f", {cells[b] / best:.2f}× best AWQ"
                cell += ")"
            out.append(cell)
        lines.append(f"| {config} | {tp} | " + " | ".join(out) + " |")
    for path in sorted(results.glob("quantize-*.json")):
        q = json.loads(path.read_text())
        peak = f"{q['peak_device_bytes'] / 2**30:.2f} GiB" if q["peak_device_bytes"] else "n/a"
        lines.append(
            f"\n{q['config']}: quantized in {q['quantize_s']} s on {q['device']}, peak device memory {peak} "
            f"(calibration {q['num_samples']}×{q['seq_len']} tokens, salient {q['salient']})"
        )
    online_rows = [json.loads(p.read_text()) for p in sorted(results.glob("online-*.json"))]
    if online_rows:
        lines += [
            "",
            f"Online ({online_rows[0]['requests']} concurrent streaming requests, {PROMPT_LEN} prompt + "
            f"{online_rows[0]['gen_len']} output tokens), ms:",
            "",
            "| config | TTFT p50 | p90 | p99 | TPOT p50 | p90 | p99 |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in online_rows:
            lines.append(
                f"| {r['config']} | "
                + " | ".join(str(r[f"{m}_ms_p{p}"]) for m in ("ttft", "tpot") for p in (50, 90, 99))
                + " |"
            )
    commands = sorted({d["command"] for d in runs.values()} | {r["command"] for r in online_rows})
    lines += ["", "Commands:", "", *[f"    {c}" for c in commands]]
    text = "\n".join(lines) + "\n"
    (args.out / "report.md").write_text(text)
    print(text)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", type=Path, required=True, help="benchmark directory (model, checkpoints, results)")
    engine = argparse.ArgumentParser(add_help=False)
    engine.add_argument("--tp", type=int, default=1, help="tensor_parallel_size")
    engine.add_argument("--max-model-len", type=int, default=512)
    engine.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    engine.add_argument("--enforce-eager", action="store_true", help="default: CUDA graphs / compiled")
    engine.add_argument("--gen-len", type=int, default=GEN_LEN)
    b = sub.add_parser("build", parents=[common])
    b.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
    b.add_argument("--num-layers", type=int)
    b.add_argument("--hidden", type=int, help="override hidden size (intermediate = 2x), for tests")
    q = sub.add_parser("quantize", parents=[common])
    q.add_argument("--bits", type=int, choices=(3, 4), nargs="+", default=[4, 3])
    q.add_argument("--device", default="cuda")
    q.add_argument("--num-samples", type=int, default=16)
    q.add_argument("--seq-len", type=int, default=512)
    q.add_argument("--salient", type=float, default=0.01)
    q.add_argument("--no-online-rotation", action="store_true",
                   help="quantize without down_proj's online rotation, into rosaq-w{bits}-norot")
    q.add_argument("--quantizer-args", default="--no-gptq --no-sequential",
                   help="more rosaq-quantize flags (default: round to nearest, which is 10x faster to quantize and "
                   "serves at the same speed; '' for the CLI's GPTQ default)")
    o = sub.add_parser("offline", parents=[common, engine])
    o.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    o.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    o.add_argument("--repeats", type=int, default=3, help="timed generates per batch size (the median is reported)")
    n = sub.add_parser("online", parents=[common, engine])
    n.add_argument("--config", choices=CONFIGS, default="rosaq-w4")
    n.add_argument("--requests", type=int, default=64)
    n.add_argument("--startup-timeout", type=float, default=420)
    sub.add_parser("report", parents=[common])
    w = sub.add_parser("_worker")  # internal: one engine in a fresh process
    for flag in ("--config", "--engine", "--env", "--result"):
        w.add_argument(flag, required=True)
    w.add_argument("--gen-len", type=int, default=GEN_LEN)
    w.add_argument("--repeats", type=int, default=3)
    w.add_argument("--batches", type=int, nargs="+", required=True)
    args = parser.parse_args(argv)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    if args.step == "build":
        build_model(args.out / "model", args.shape, args.num_layers, args.hidden)
    elif args.step == "quantize":
        for bits in args.bits:
            result = quantize(args.out, bits, args.device, args.num_samples, args.seq_len, args.salient,
                              tuple(shlex.split(args.quantizer_args)), online_rotation=not args.no_online_rotation)
            print(json.dumps(result))
    elif args.step == "offline":
        offline(args)
    elif args.step == "online":
        online(args)
    elif args.step == "report":
        report(args)
    else:
        worker(args)


if __name__ == "__main__":
    main()
