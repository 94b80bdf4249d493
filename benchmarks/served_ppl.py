"""Perplexity of a ROSAQ checkpoint served by vLLM's OpenAI server (prompt logprobs) vs the offline evaluation.

Both sides score exactly the same token windows: the held-out text tokenized with the checkpoint's tokenizer,
cut into non-overlapping windows of ``--context`` tokens (as ``offline_quantizer.evaluate.token_nll`` does).
The served side sends each window as a token-id prompt to ``/v1/completions`` with ``prompt_logprobs=0`` and
``max_tokens=1`` and reads the log-probability of every prompt token; the offline side loads the checkpoint
through the torch reference linear (``evaluate.load_reference_model``, what the plugin computes on CPU).

Usage (starts the server itself unless ``--url`` is given; the ``rosaq`` plugin is picked up automatically):
  python benchmarks/served_ppl.py CHECKPOINT --context 512 --windows 4 [--text wiki|wt2|FILE] [--url URL]
      [--json bench_runs/served-ppl.json]
Exit status 1 when the two perplexities differ by more than ``--tolerance`` (relative, default 1 %).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import urllib.request
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def token_windows(token_ids: torch.Tensor, context: int, windows: int) -> torch.Tensor:
    """The first ``windows`` non-overlapping windows ``[windows, context]`` of ``token_ids`` (as ``token_nll``)."""
    needed = context * windows
    if token_ids.numel() < needed:
        raise ValueError(f"need {needed} tokens for {windows} windows of {context}, got {token_ids.numel()}")
    return token_ids[:needed].view(windows, context)


def _post(url: str, body: dict, timeout_s: float) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.loads(response.read())


def served_window_nll(base_url: str, window: list[int], model: str = "rosaq", timeout_s: float = 600) -> list[float]:
    """NLL of positions ``1..len(window)-1`` of one token window, from the server's prompt logprobs."""
    reply = _post(
        f"{base_url.rstrip('/')}/completions",
        {
            "model": model,
            "prompt": window,
            "max_tokens": 1,
            "temperature": 0.0,
            "prompt_logprobs": 0,
            "return_token_ids": True,
        },
        timeout_s,
    )
    choice = reply["choices"][0]
    if choice.get("prompt_token_ids") not in (None, window):
        raise RuntimeError("the server changed the prompt tokens (it must not add BOS or re-tokenize)")
    logprobs = choice["prompt_logprobs"]
    if len(logprobs) != len(window) or logprobs[0] is not None:
        raise RuntimeError(f"expected {len(window)} prompt logprobs (first None), got {len(logprobs)}")
    nll = []
    for token, entry in zip(window[1:], logprobs[1:], strict=True):
        if str(token) not in entry:
            raise RuntimeError(f"prompt logprobs miss the prompt token {token}: {sorted(entry)}")
        nll.append(-float(entry[str(token)]["logprob"]))
    return nll


def served_nll(base_url: str, windows: torch.Tensor, model: str = "rosaq") -> torch.Tensor:
    """Float64 ``[windows, context - 1]`` NLLs from the server (same layout as ``evaluate.token_nll``)."""
    return torch.tensor([served_window_nll(base_url, w.tolist(), model) for w in windows], dtype=torch.float64)


def offline_nll(checkpoint: str | Path, windows: torch.Tensor, batch_size: int = 1) -> torch.Tensor:
    """The same NLLs from the checkpoint loaded through the torch reference linear."""
    from offline_quantizer.evaluate import load_reference_model, token_nll

    model = load_reference_model(checkpoint)
    return token_nll(model, windows.reshape(-1), windows.shape[1], batch_size)


def compare(served: torch.Tensor, offline: torch.Tensor) -> dict:
    """Perplexities of both NLL tables, their relative difference and the largest per-token NLL difference."""
    ppl_served, ppl_offline = math.exp(served.mean().item()), math.exp(offline.mean().item())
    return {
        "ppl_served": ppl_served,
        "ppl_offline": ppl_offline,
        "rel_diff": abs(ppl_served - ppl_offline) / ppl_offline,
        "max_token_nll_diff": (served - offline).abs().max().item(),
        "windows": served.shape[0],
        "context": served.shape[1] + 1,
    }


def _text_ids(checkpoint: Path, text: str, max_tokens: int) -> torch.Tensor:
    from transformers import AutoTokenizer

    sys.path.insert(0, str(REPO))
    from benchmarks.eval_accuracy import WIKITEXT
    from offline_quantizer import assets

    if text == "wiki":
        raw = assets.heldout_text()
    elif text == "wt2":
        raw = WIKITEXT.read_text(encoding="utf-8").replace("\r\n", "\n")
    else:
        raw = Path(text).read_text(encoding="utf-8")
    # tokenized as the offline evaluation does (rosaq-eval / eval_accuracy: default special tokens)
    return AutoTokenizer.from_pretrained(checkpoint)(raw[: max_tokens * 8], return_tensors="pt").input_ids[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="ROSAQ checkpoint directory")
    parser.add_argument("--url", help="base URL of a running server (http://HOST:PORT/v1); default: start one")
    parser.add_argument("--served-model-name", default="rosaq")
    parser.add_argument("--text", default="wiki", help="'wiki', 'wt2' or a UTF-8 text file")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--tolerance", type=float, default=0.01, help="relative perplexity tolerance")
    parser.add_argument("--json", help="write the result to this JSON file")
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra argument for the server (repeat), e.g. --server-arg=--enforce-eager",
    )
    args = parser.parse_args(argv)
    checkpoint = Path(args.checkpoint).resolve()
    windows = token_windows(_text_ids(checkpoint, args.text, args.context * args.windows), args.context, args.windows)
    start = time.monotonic()
    if args.url:
        served = served_nll(args.url, windows, args.served_model_name)
    else:
        sys.path.insert(0, str(REPO))
        from tests.vllm_server import openai_server

        server_args = ["--max-model-len", str(args.context + 16), "--max-num-seqs", "1", *args.server_arg]
        with openai_server(checkpoint, *server_args, env={"VLLM_CPU_KVCACHE_SPACE": "2"}) as url:
            served = served_nll(url, windows, args.served_model_name)
    served_s = time.monotonic() - start
    offline = offline_nll(checkpoint, windows)
    result = {
        "checkpoint": str(checkpoint),
        "text": args.text,
        **compare(served, offline),
        "served_wall_s_incl_startup": round(served_s, 1),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    ok = result["rel_diff"] <= args.tolerance
    print(
        f"served ppl {result['ppl_served']:.4f} vs offline {result['ppl_offline']:.4f}: "
        f"{100 * result['rel_diff']:.4f} % ({'within' if ok else 'OUTSIDE'} {100 * args.tolerance:g} %)"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
