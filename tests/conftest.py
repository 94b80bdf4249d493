"""Session fixtures: tiny random models (built locally, nothing downloaded) and their ROSAQ checkpoints."""

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run in its interpreter on CPU (must be set before import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.tiny_models import calibration_corpus, make_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory):
    """``tiny_model_dir(arch)``: a cached tiny Hugging Face model directory of that architecture."""
    built: dict[str, Path] = {}

    def build(arch: str) -> Path:
        if arch not in built:
            built[arch] = make_tiny_model(arch, tmp_path_factory.mktemp(f"tiny-{arch}"))
        return built[arch]

    return build


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_model_dir, tmp_path_factory: pytest.TempPathFactory):
    """``tiny_checkpoint(arch, **options)``: a cached ROSAQ checkpoint of a tiny model."""
    from offline_quantizer.pipeline import QuantizeOptions, quantize_checkpoint

    built: dict[tuple, Path] = {}

    def build(arch: str, **options) -> Path:
        key = (arch, tuple(sorted(options.items())))
        if key not in built:
            opts = QuantizeOptions(**{"group_size": 32, "salient": 16, "block_size": 64, **options})
            out = tmp_path_factory.mktemp(f"rosaq-{arch}") / "ckpt"
            built[key] = quantize_checkpoint(tiny_model_dir(arch), out, calibration_corpus(), opts,
                                             num_samples=8, seq_len=64, batch_size=4)
        return built[key]

    return build


@pytest.fixture
def checkpoint_copy(tiny_checkpoint, tmp_path: Path) -> Path:
    """A private, writable copy of the tiny Llama ROSAQ checkpoint (for corrupting it)."""
    import shutil

    copy = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint("llama"), copy)
    return copy
