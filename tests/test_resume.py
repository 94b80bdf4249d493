"""An interrupted quantization publishes nothing and resumes to a byte-identical checkpoint."""

from pathlib import Path

import pytest

from offline_quantizer.pipeline import QuantizeOptions, quantize_checkpoint
from offline_quantizer.workdir import WorkDir
from tests.tiny_models import calibration_corpus

OPTS = QuantizeOptions(group_size=32, salient=16, block_size=64)


def _quantize(model: Path, out: Path, **kwargs) -> Path:
    return quantize_checkpoint(model, out, calibration_corpus(), OPTS, num_samples=8, seq_len=64, batch_size=4,
                               **kwargs)


def test_interrupt_then_resume_is_byte_identical(tiny_model_dir, tmp_path: Path, monkeypatch) -> None:
    model = tiny_model_dir("qwen2")
    reference = _quantize(model, tmp_path / "reference")

    save_layer = WorkDir.save_layer

    def save_then_interrupt(self: WorkDir, index: int, tensors) -> None:
        save_layer(self, index, tensors)
        raise KeyboardInterrupt  # what Ctrl-C (SIGINT) raises mid-run

    monkeypatch.setattr(WorkDir, "save_layer", save_then_interrupt)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        _quantize(model, out)
    assert not out.exists()
    work = tmp_path / ".resumed.work"
    assert {p.name for p in work.iterdir()} == {"layer-00000.safetensors", "residual_basis.safetensors",
                                                "state.json"}

    monkeypatch.setattr(WorkDir, "save_layer", save_layer)
    resumed_layers = []
    load_layer = WorkDir.load_layer
    monkeypatch.setattr(WorkDir, "load_layer", lambda self, i: resumed_layers.append(i) or load_layer(self, i))
    _quantize(model, out, resume=True)
    assert resumed_layers == [0]
    assert not work.exists()
    assert (out / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()


def test_sequential_resume_is_byte_identical(tiny_model_dir, tmp_path: Path, monkeypatch) -> None:
    """Sequential calibration: the resumed run rebuilds the finished layers' quantized function from the work
    directory (v_proj's rotated bias included: qwen2), so the later layers see the same inputs."""
    model = tiny_model_dir("qwen2")
    opts = QuantizeOptions(group_size=32, salient=16, block_size=64, gptq=True, act_order=True, sequential=True)

    def run(out: Path, **kwargs) -> Path:
        return quantize_checkpoint(model, out, calibration_corpus(), opts, num_samples=8, seq_len=64, batch_size=4,
                                   **kwargs)

    reference = run(tmp_path / "reference")
    save_layer = WorkDir.save_layer

    def save_then_interrupt(self: WorkDir, index: int, tensors) -> None:
        save_layer(self, index, tensors)
        raise KeyboardInterrupt  # after layer 0: the resumed run computes layer 1 on restored layer 0

    monkeypatch.setattr(WorkDir, "save_layer", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed")
    monkeypatch.setattr(WorkDir, "save_layer", save_layer)
    run(tmp_path / "resumed", resume=True)
    assert (tmp_path / "resumed" / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()


def test_resume_refuses_a_work_dir_of_another_run(tiny_model_dir, tmp_path: Path, monkeypatch) -> None:
    def interrupt(self: WorkDir, index: int, tensors) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(WorkDir, "save_layer", interrupt)
    with pytest.raises(KeyboardInterrupt):
        _quantize(tiny_model_dir("llama"), tmp_path / "ckpt")
    monkeypatch.undo()
    with pytest.raises(ValueError, match="other options"):
        quantize_checkpoint(tiny_model_dir("llama"), tmp_path / "ckpt", calibration_corpus(),
                            QuantizeOptions(bits=3, group_size=32, salient=16, block_size=64),
                            num_samples=8, seq_len=64, batch_size=4, resume=True)


def test_sigkill_mid_run_then_resume(tmp_path: Path) -> None:
    """A real SIGKILL of ``rosaq-quantize`` after its first finished layer; ``--resume`` completes it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.tiny_models import make_tiny_model

    model = make_tiny_model("llama", tmp_path / "model", num_layers=12)
    calib = tmp_path / "calib.txt"
    calib.write_text(calibration_corpus())
    out, work = tmp_path / "ckpt", tmp_path / ".ckpt.work"
    cmd = [sys.executable, "-m", "offline_quantizer", str(model), str(out), "--group-size", "32", "--salient", "16",
           "--block-size", "64", "--calib", str(calib), "--num-samples", "32", "--seq-len", "64"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (work / "layer-00000.safetensors").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "quantizer ended before its first layer"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "the run finished before it was killed; nothing was tested"
    done = sorted(p.name for p in work.glob("layer-*.safetensors"))
    assert 1 <= len(done) < 12
    subprocess.run([*cmd, "--resume"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run([*cmd[:4], str(tmp_path / "fresh"), *cmd[5:]], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "fresh" / "model.safetensors").read_bytes()
    assert not work.exists()
