"""The checkpoint format: config validation, round trip, and errors that name the tensor or key."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rosaq_vllm.checkpoint import (
    CheckpointError,
    RosaqQuantConfig,
    atomic_output_dir,
    load_tensors,
    validate_checkpoint,
)


def test_config_round_trip() -> None:
    cfg = RosaqQuantConfig(bits=3, group_size=64, salient_fraction=0.03, rotation="per-layer",
                           rotation_block_size=0, online_rotation=("q_proj", "k_proj", "v_proj"))
    assert RosaqQuantConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("key,value,match", [
    ("bits", 5, "bits"),
    ("bits", "4", "bits"),
    ("group_size", 100, "group_size"),
    ("group_size", 16, "group_size"),
    ("salient_fraction", 1.5, "salient_fraction"),
    ("rotation", "hadamard", "rotation"),
    ("rotation_block_size", -1, "rotation_block_size"),
    ("online_rotation", ["q_proj"], "online_rotation"),
    ("online_rotation", "down_proj", "online_rotation"),
    ("format_version", 99, "format_version"),
    ("colour", "blue", "colour"),
])
def test_bad_config_values_name_the_key(key: str, value, match: str) -> None:
    config = RosaqQuantConfig().to_dict()
    config[key] = value
    with pytest.raises(CheckpointError, match=match):
        RosaqQuantConfig.from_dict(config)


def test_salient_count_rounding_and_limits() -> None:
    assert RosaqQuantConfig(salient_fraction=0.01).num_salient_for(4096) == 48  # 40.96 -> 48
    assert RosaqQuantConfig(salient_fraction=0.01).num_salient_for(576) == 0
    assert RosaqQuantConfig(num_salient=20, salient_fraction=None).num_salient_for(64) == 16
    with pytest.raises(CheckpointError, match="leave nothing to quantize"):
        RosaqQuantConfig(num_salient=64, salient_fraction=None).num_salient_for(64)


def _rewrite(path: Path, edit) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_round_trip_loads_every_tensor(checkpoint_copy: Path) -> None:
    cfg = validate_checkpoint(checkpoint_copy)
    tensors = load_tensors(checkpoint_copy)
    assert cfg.rotation == "absorbed"
    qweight = tensors["model.layers.0.self_attn.q_proj.qweight"]
    assert qweight.dtype == torch.int32 and qweight.abs().sum() > 0
    assert tensors["model.layers.1.mlp.down_proj.rot"].shape == (4, 64, 64)


NAME = "model.layers.1.mlp.down_proj.rot"


@pytest.mark.parametrize("edit,match", [
    (lambda t: t.pop(NAME), f"{NAME}: missing"),
    (lambda t: t.update({"model.layers.0.mlp.up_proj.extra": torch.ones(3)}), "up_proj.extra.*unexpected"),
    (lambda t: t.update({NAME: t[NAME][:2]}), f"{NAME}.*shape"),
    (lambda t: t.update({NAME: t[NAME].half()}), f"{NAME}.*dtype F16, expected F32"),
    (lambda t: t.update({"model.layers.0.self_attn.q_proj.qweight":
                         t["model.layers.0.self_attn.q_proj.qweight"].float()}), "q_proj.qweight.*dtype"),
])
def test_corrupt_checkpoints_name_the_tensor(checkpoint_copy: Path, edit, match: str) -> None:
    _rewrite(checkpoint_copy, edit)
    with pytest.raises(CheckpointError, match=match):
        validate_checkpoint(checkpoint_copy)


def test_truncated_file_is_detected(checkpoint_copy: Path) -> None:
    path = checkpoint_copy / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        validate_checkpoint(checkpoint_copy)


def test_config_for_another_model_is_detected(checkpoint_copy: Path) -> None:
    config = json.loads((checkpoint_copy / "config.json").read_text())
    config["intermediate_size"] *= 2
    (checkpoint_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="gate_proj.*shape"):
        validate_checkpoint(checkpoint_copy)


def test_interrupted_write_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "ckpt"

    def write_then_fail(tmp: Path) -> None:
        save_file({"a": torch.ones(2)}, tmp / "model.safetensors")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_output_dir(out, write_then_fail)
    assert list(tmp_path.iterdir()) == []


def test_invalid_result_is_never_published(tmp_path: Path, checkpoint_copy: Path) -> None:
    out = tmp_path / "published"

    def write_corrupt(tmp: Path) -> None:
        shutil.copytree(checkpoint_copy, tmp, dirs_exist_ok=True)
        _rewrite(tmp, lambda t: t.pop(NAME))

    with pytest.raises(CheckpointError, match="missing"):
        atomic_output_dir(out, write_corrupt)
    assert not out.exists()
