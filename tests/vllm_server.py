"""Start vLLM's OpenAI server on loopback for a test and stop it afterwards."""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server's whole process group (API server, engine core, workers)."""
    for sig, wait_s in ((15, 60), (9, 30)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(cmd: list[str], port: int, log_path: Path, env: dict[str, str], timeout_s: float) -> Iterator[None]:
    """Run ``cmd`` (a server listening on ``port``) until ``/health`` answers 200; stop its process group after."""
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"vLLM server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"vLLM server not healthy after {timeout_s}s:\n{log_path.read_text()[-4000:]}")
                time.sleep(2)
            yield
        finally:
            _stop(proc)


@contextmanager
def openai_server(model: Path, *extra_args: str, env: dict[str, str] | None = None,
                  timeout_s: float = 600) -> Iterator[str]:
    """Yield the base URL (``http://127.0.0.1:PORT/v1``) of a running server; its log goes to ``model/../``."""
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "256",
           "--max-num-seqs", "4", "--served-model-name", "rosaq", *extra_args]
    full_env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})}
    with running_server(cmd, port, model.parent / f"vllm-{port}.log", full_env, timeout_s):
        yield f"http://127.0.0.1:{port}/v1"
