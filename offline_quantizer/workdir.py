"""The work directory of a quantization run: finished layers on disk, so an interrupted run can ``--resume``.

Layout (``.<output name>.work`` beside the output): ``state.json`` (the fingerprint of the run: model,
options, calibration data), ``residual_basis.safetensors`` (absorbed mode) and one
``layer-<i>.safetensors`` per finished decoder layer, each written atomically.
"""

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


class WorkDir:
    """Finished per-layer results of one quantization run.

    Args:
        path: the work directory.
        fingerprint: JSON-serialisable description of the run; resuming needs an identical one.
        resume: keep the finished layers of an earlier run with the same fingerprint.
    """

    def __init__(self, path: Path, fingerprint: dict[str, Any], resume: bool) -> None:
        self.path = Path(path)
        state = self.path / "state.json"
        if resume and state.is_file():
            if json.loads(state.read_text()) != fingerprint:
                raise ValueError(f"{self.path} belongs to a run with other options, model or calibration data; "
                                 "run again without --resume to start over")
            return
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir(parents=True)
        state.write_text(json.dumps(fingerprint, indent=2, sort_keys=True))

    def _save(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        tmp = self.path / f".{name}.tmp"
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
        os.replace(tmp, self.path / name)

    def save_basis(self, basis: torch.Tensor) -> None:
        self._save("residual_basis.safetensors", {"basis": basis})

    def load_basis(self) -> torch.Tensor | None:
        path = self.path / "residual_basis.safetensors"
        return load_file(path)["basis"] if path.is_file() else None

    def save_layer(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        self._save(f"layer-{index:05d}.safetensors", tensors)

    def load_layer(self, index: int) -> dict[str, torch.Tensor]:
        return load_file(self.path / f"layer-{index:05d}.safetensors")

    def finished_layers(self) -> int:
        """Number of consecutive finished layers from layer 0."""
        count = 0
        while (self.path / f"layer-{count:05d}.safetensors").is_file():
            count += 1
        return count

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
