"""Bad input: every broken config or checkpoint is refused with a CheckpointError naming the key or tensor.

Extends ``test_checkpoint.py`` (which covers one missing / extra / mis-shaped / wrongly-typed tensor, a cut
file and a few bad config values) with wrong JSON types, nulls, floats for ints, NaN, unknown versions,
checkpoints for another model, corrupt safetensors headers, shards, NaN data and pickle-only checkpoints.
"""

import json
import math
import pickle
import struct
from pathlib import Path

import pytest
import torch
from rosaq_kernels.packing import pack_zeros, unpack_zeros
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from rosaq_vllm.checkpoint import (
    CheckpointError,
    RosaqQuantConfig,
    read_safetensors_header,
    validate_checkpoint,
    write_tensors,
)

Q = "model.layers.0.self_attn.q_proj"
DOWN = "model.layers.1.mlp.down_proj"
ST = "model.safetensors"


def _base_config(**changes) -> dict:
    config = RosaqQuantConfig().to_dict()
    config.update(changes)
    return config


# --- quantization_config ------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", [[], "rosaq", None, 4, 0.5, [("bits", 4)]], ids=repr)
def test_quantization_config_that_is_not_an_object(config) -> None:
    with pytest.raises(CheckpointError, match="quantization_config: expected a JSON object"):
        RosaqQuantConfig.from_dict(config)


@pytest.mark.parametrize("key,value,match", [
    # null values
    ("bits", None, "bits: None is not an integer"),
    ("group_size", None, "group_size: None is not an integer"),
    ("rotation", None, "rotation: unknown mode None"),
    ("rotation_block_size", None, "rotation_block_size: None is not an integer"),
    ("format_version", None, "format_version: None is not an integer"),
    ("online_rotation", None, "online_rotation: None is not a list"),
    ("salient_fraction", None, "num_salient / salient_fraction: exactly one"),
    ("quant_method", None, "quant_method: 'none' is not 'rosaq'"),
    # floats (and booleans) where integers belong
    ("bits", 4.0, "bits: 4.0 is not an integer"),
    ("bits", True, "bits: True is not an integer"),
    ("group_size", 128.0, "group_size: 128.0 is not an integer"),
    ("rotation_block_size", 64.5, "rotation_block_size: 64.5 is not an integer"),
    ("format_version", 1.0, "format_version: 1.0 is not an integer"),
    # NaN / infinite / negative / string fractions
    ("salient_fraction", math.nan, "salient_fraction: nan is not a number in"),
    ("salient_fraction", math.inf, "salient_fraction: inf is not a number in"),
    ("salient_fraction", -math.inf, "salient_fraction: -inf is not a number in"),
    ("salient_fraction", -0.01, "salient_fraction: -0.01 is not a number in"),
    ("salient_fraction", "0.01", "salient_fraction: '0.01' is not a number in"),
    ("salient_fraction", True, "salient_fraction: True is not a number in"),
    # other types and ranges not covered by test_checkpoint.py
    ("bits", 8, "bits: 8 is not supported"),
    ("group_size", 0, "group_size: 0 is below 32"),
    ("group_size", -32, "group_size: -32 is below 32"),
    ("rotation", ["absorbed"], "rotation: unknown mode"),
    ("online_rotation", [1, 2], "online_rotation: .* is not a list of projection names"),
    ("online_rotation", [["down_proj"]], "online_rotation: .* is not a list of projection names"),
    ("online_rotation", {"down_proj": True}, "online_rotation: .* is not a list"),
    ("online_rotation", ["down_proj", "down_proj"], "online_rotation: .* lists a projection twice"),
    ("quant_method", "gptq", "quant_method: 'gptq' is not 'rosaq'. This checkpoint is not a ROSAQ"),
])
def test_wrong_types_nulls_and_ranges_name_the_key(key: str, value, match: str) -> None:
    with pytest.raises(CheckpointError, match=match):
        RosaqQuantConfig.from_dict(_base_config(**{key: value}))


def test_num_salient_as_float_or_negative_names_the_key() -> None:
    for value, match in ((16.0, "num_salient: 16.0 is not an integer"), (-16, "num_salient: -16 is below 0")):
        with pytest.raises(CheckpointError, match=match):
            RosaqQuantConfig.from_dict(_base_config(num_salient=value, salient_fraction=None))


def test_non_string_keys_are_unknown_keys() -> None:
    config: dict = {**_base_config(), 1: 2, (3,): 4}
    with pytest.raises(CheckpointError, match=r"quantization_config\.\S+: unknown key"):
        RosaqQuantConfig.from_dict(config)


@pytest.mark.parametrize("version", [0, 1, 3, -1, 10**30])
def test_unknown_format_version_says_upgrade_or_requantize(version: int) -> None:
    """Version 1 (uint8 zero points, before 2026-11-24) is refused too: re-quantize."""
    with pytest.raises(CheckpointError, match=rf"format_version: version {version} is not supported \(this "
                       r"rosaq-vllm reads 2\)\. Upgrade rosaq-vllm or re-quantize"):
        RosaqQuantConfig.from_dict(_base_config(format_version=version))


def test_missing_format_version() -> None:
    config = _base_config()
    del config["format_version"]
    with pytest.raises(CheckpointError, match="format_version: missing"):
        RosaqQuantConfig.from_dict(config)


def test_plugin_config_entry_point_refuses_non_object() -> None:
    from rosaq_vllm.config import RosaqConfig

    with pytest.raises(CheckpointError, match="expected a JSON object, got list"):
        RosaqConfig.from_config(["rosaq"])  # type: ignore[arg-type]


# --- config.json --------------------------------------------------------------------------------------------

@pytest.fixture
def ckpt(checkpoint_copy: Path) -> Path:
    return checkpoint_copy


def _edit_config(ckpt: Path, edit) -> None:
    path = ckpt / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("text,match", [
    ("{not json", "config.json: not valid JSON"),
    ("[1, 2]", "config.json: expected a JSON object, got list"),
    ('"quantization_config"', "config.json: expected a JSON object, got str"),
    ("42", "config.json: expected a JSON object, got int"),
    ("{}", "config.json: no quantization_config"),
    ("[" * 100_000, "config.json: not valid JSON"),
])
def test_config_json_that_is_not_a_model_config(ckpt: Path, text: str, match: str) -> None:
    (ckpt / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=match):
        validate_checkpoint(ckpt)


@pytest.mark.parametrize("key,value", [("hidden_size", "128"), ("hidden_size", 128.0), ("hidden_size", None),
                                       ("vocab_size", -1), ("num_hidden_layers", 0), ("intermediate_size", True)])
def test_config_json_sizes_of_the_wrong_type(ckpt: Path, key: str, value) -> None:
    _edit_config(ckpt, lambda c: c.update({key: value}))
    with pytest.raises(CheckpointError, match=f"config.json {key}: .* is not a positive integer"):
        validate_checkpoint(ckpt)


def test_unsupported_architecture(ckpt: Path) -> None:
    _edit_config(ckpt, lambda c: c.update(model_type="gpt2"))
    with pytest.raises(CheckpointError, match="config.json model_type: 'gpt2' is not supported"):
        validate_checkpoint(ckpt)


@pytest.mark.parametrize("changes,match", [
    ({"vocab_size": 1000}, r"model\.embed_tokens\.weight in model\.safetensors: shape \(\d+, 128\), expected "
                           r"\(1000, 128\)"),
    ({"hidden_size": 256, "head_dim": 32}, r"model\.embed_tokens\.weight in model\.safetensors: shape"),
    ({"num_attention_heads": 8}, rf"{Q}\.qweight in model\.safetensors: shape \(128, 16\), expected \(256, 16\)"),
    ({"num_key_value_heads": 4}, r"model\.layers\.0\.self_attn\.k_proj\.qweight in .*: shape"),
    ({"num_hidden_layers": 3}, r"model\.layers\.2\.input_layernorm\.weight: missing from the checkpoint "
                               r"\(config\.json num_hidden_layers is 3\)"),
    ({"num_hidden_layers": 10**9}, r"model\.layers\.999999999\.input_layernorm\.weight: missing"),
    ({"num_hidden_layers": 1}, r"model\.layers\.1\.\S+ in model\.safetensors: unexpected tensor"),
    ({"model_type": "qwen2"}, rf"{Q}\.bias: missing from the checkpoint"),
    ({"attention_bias": True}, rf"{Q}\.bias: missing from the checkpoint"),
    ({"tie_word_embeddings": True}, r"lm_head\.weight in model\.safetensors: unexpected tensor"),
])
def test_checkpoint_for_another_model_names_the_tensor(ckpt: Path, changes: dict, match: str) -> None:
    _edit_config(ckpt, lambda c: c.update(changes))
    with pytest.raises(CheckpointError, match=match) as info:
        validate_checkpoint(ckpt)
    assert "re-run rosaq-quantize for this model" in str(info.value)


@pytest.mark.parametrize("changes,match", [
    ({"bits": 3}, rf"{Q}\.qweight in model\.safetensors: shape \(128, 16\), expected \(128, 12\)"),
    ({"group_size": 64}, rf"{Q}\.scales in model\.safetensors: shape \(128, 4\), expected \(128, 2\)"),
    ({"num_salient": 32}, rf"{Q}\.salient_idx in model\.safetensors: shape \(16,\), expected \(32,\)"),
    ({"online_rotation": []}, r"model\.layers\.0\.mlp\.down_proj\.rot in model\.safetensors: unexpected"),
    ({"rotation_block_size": 128}, r"model\.layers\.0\.mlp\.down_proj\.rot in .*: shape \(4, 64, 64\), "
                                   r"expected \(2, 128, 128\)"),
    ({"group_size": 96}, r"q_proj: 128 input channels are not divisible by group_size 96"),
])
def test_quantization_config_that_does_not_match_the_tensors(ckpt: Path, changes: dict, match: str) -> None:
    _edit_config(ckpt, lambda c: c["quantization_config"].update(changes))
    with pytest.raises(CheckpointError, match=match):
        validate_checkpoint(ckpt)


# --- tensors: dtypes, shapes, shards ------------------------------------------------------------------------

def _rewrite(ckpt: Path, edit) -> None:
    tensors = load_file(ckpt / ST)
    edit(tensors)
    save_file(tensors, ckpt / ST, metadata={"format": "pt"})


@pytest.mark.parametrize("name,convert,match", [
    (f"{Q}.qzeros", lambda t: t.to(torch.uint8), "dtype U8, expected I32"),
    (f"{Q}.qzeros", lambda t: t.t().contiguous(), r"shape \(16, 4\), expected \(4, 16\)"),
    (f"{Q}.scales", lambda t: t.bfloat16(), "dtype BF16, expected F16"),
    (f"{Q}.salient_idx", lambda t: t.long(), "dtype I64, expected I32"),
    (f"{Q}.salient_weight", lambda t: t.t().contiguous(), r"shape \(16, 128\), expected \(128, 16\)"),
    (f"{Q}.qweight", lambda t: t.reshape(-1), r"shape \(2048,\), expected \(128, 16\)"),
    ("model.embed_tokens.weight", lambda t: t.int(), "dtype I32, expected a float dtype"),
    ("model.norm.weight", lambda t: t[None], r"shape \(1, 128\), expected \(128,\)"),
])
def test_wrong_dtype_or_shape_names_the_tensor(ckpt: Path, name: str, convert, match: str) -> None:
    _rewrite(ckpt, lambda t: t.update({name: convert(t[name])}))
    with pytest.raises(CheckpointError, match=f"{name} in model.safetensors: {match}"):
        validate_checkpoint(ckpt)


@pytest.fixture
def sharded(ckpt: Path) -> Path:
    tensors = load_file(ckpt / ST)
    (ckpt / ST).unlink()
    write_tensors(ckpt, tensors, max_shard_bytes=200_000)
    assert len(list(ckpt.glob("model-*.safetensors"))) > 2
    validate_checkpoint(ckpt)
    return ckpt


def test_missing_shard_is_named(sharded: Path) -> None:
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=r"^\S+: missing from the checkpoint"):
        validate_checkpoint(sharded)


def test_index_that_points_to_the_wrong_shard(sharded: Path) -> None:
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    name, file = next(iter(index["weight_map"].items()))
    index["weight_map"][name] = "model-00009-of-00009.safetensors"
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"{name} in {file}: model.safetensors.index.json places it in "
                       "'model-00009-of-00009.safetensors'"):
        validate_checkpoint(sharded)


def test_corrupt_index_is_refused(sharded: Path) -> None:
    (sharded / "model.safetensors.index.json").write_text("[]")
    with pytest.raises(CheckpointError, match="model.safetensors.index.json: not a JSON object with a weight_map"):
        validate_checkpoint(sharded)


def test_tensor_stored_twice_is_named(sharded: Path) -> None:
    shards = sorted(sharded.glob("model-*.safetensors"))
    first = load_file(shards[0])
    name = next(iter(first))
    second = load_file(shards[1])
    second[name] = first[name]
    save_file(second, shards[1])
    with pytest.raises(CheckpointError, match=f"{name} in {shards[1].name}: also stored in {shards[0].name}"):
        validate_checkpoint(sharded)


# --- safetensors files: corrupt headers and truncation --------------------------------------------------------

def _file(path: Path, header, data: bytes = b"", header_len: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)
    return path


A = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
B = {"dtype": "I32", "shape": [1], "data_offsets": [8, 12]}


@pytest.mark.parametrize("header,data,header_len,match", [
    (b"", b"", 0, "file is too short to be safetensors|corrupt safetensors header"),
    ({"a": A}, bytes(8), 10**6, "corrupt or truncated safetensors header"),
    ({"a": A}, bytes(8), 2**64 - 1, "corrupt or truncated safetensors header"),
    (b"[1, 2]", b"", None, "corrupt safetensors header \\(not a JSON object\\)"),
    (b"{garbage", b"", None, "corrupt safetensors header \\(JSONDecodeError\\)"),
    (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", b"", None, "corrupt safetensors header"),
    (b'{"a": "\xff\xfe"}', b"", None, "corrupt safetensors header \\(UnicodeDecodeError\\)"),
    ({"a": [1, 2]}, b"", None, "a in x.safetensors: corrupt header entry \\(not an object"),
    ({"a": {**A, "dtype": "Q4"}}, bytes(8), None, "a in x.safetensors: corrupt header entry \\(unknown dtype 'Q4'"),
    ({"a": {**A, "shape": [-2]}}, bytes(8), None, "a in x.safetensors: .*shape \\[-2\\] is not a list of sizes"),
    ({"a": {**A, "shape": [2.0]}}, bytes(8), None, "a in x.safetensors: .*shape \\[2.0\\] is not a list of sizes"),
    ({"a": {**A, "shape": [True, 2]}}, bytes(8), None, "a in x.safetensors: .*is not a list of sizes"),
    ({"a": {**A, "data_offsets": [8, 0]}}, bytes(8), None, "a in x.safetensors: .*data_offsets \\[8, 0\\]"),
    ({"a": {**A, "data_offsets": [0, "8"]}}, bytes(8), None, "a in x.safetensors: .*data_offsets"),
    ({"a": {**A, "data_offsets": [0, 8, 16]}}, bytes(16), None, "a in x.safetensors: .*data_offsets"),
    ({"a": {**A, "shape": [3]}}, bytes(8), None, "a in x.safetensors: 8 data bytes do not hold a F32 tensor"),
    ({"a": {**A, "shape": [2**40, 2**40, 0]}}, bytes(8), None, "a in x.safetensors: 8 data bytes do not hold"),
    ({"a": A, "b": {**B, "shape": [2], "data_offsets": [4, 8]}}, bytes(12), None,
     "b in x.safetensors: 4 data bytes do not hold a I32 tensor of shape \\(2,\\)"),
    ({"a": A, "b": {**B, "data_offsets": [4, 8]}}, bytes(12), None,
     "b in x.safetensors: data starts at byte 4, expected 8 \\(overlapping"),
    ({"a": A, "b": {**B, "data_offsets": [12, 16]}}, bytes(16), None, "b in x.safetensors: data starts at byte "
                                                                         "12, expected 8"),
    ({"a": A, "b": B}, bytes(20), None, "x.safetensors: 8 bytes after the last tensor"),
    ({"a": A, "b": B}, bytes(10), None, "b in x.safetensors: data ends at byte 12 but the file holds 10 bytes "
                                        "of data \\(truncated"),
    ({"__metadata__": {"format": 1}, "a": A}, bytes(8), None, "__metadata__ in x.safetensors: not a map of "
                                                              "strings"),
    ({"a": {**A, "extra": 1}}, bytes(8), None, "a in x.safetensors: corrupt header entry"),
])
def test_corrupt_safetensors_headers(tmp_path: Path, header, data: bytes, header_len, match: str) -> None:
    path = _file(tmp_path / "x.safetensors", header, data, header_len)
    with pytest.raises(CheckpointError, match=match) as info:
        read_safetensors_header(path)
    assert "Re-copy the checkpoint or re-quantize" in str(info.value)


def test_corrupt_headers_are_also_refused_by_safetensors(tmp_path: Path) -> None:
    """Sanity check of the rules above against the real library (all but the stricter 'extra key' rule)."""
    path = _file(tmp_path / "x.safetensors", {"a": A, "b": {**B, "data_offsets": [12, 16]}}, bytes(16))
    with pytest.raises((SafetensorError, OSError)):
        with safe_open(path, framework="pt") as f:
            f.get_tensor("b")
    path = _file(tmp_path / "y.safetensors", {"a": A, "b": B}, bytes(20))
    with pytest.raises((SafetensorError, OSError)):
        safe_open(path, framework="pt")
    path = _file(tmp_path / "z.safetensors", {"a": A, "b": B}, bytes(12))
    assert set(read_safetensors_header(path)) == {"a", "b"}
    with safe_open(path, framework="pt") as f:
        assert f.get_tensor("b").shape == (1,)


@pytest.mark.parametrize("keep", [0, 4, 8, 100, -1], ids=["empty", "4B", "8B", "in-header", "data-start"])
def test_truncated_checkpoint_file(ckpt: Path, keep: int) -> None:
    path = ckpt / ST
    raw = path.read_bytes()
    if keep == -1:
        keep = 8 + struct.unpack("<Q", raw[:8])[0]  # header intact, every byte of data gone
    path.write_bytes(raw[:keep])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*(too short|truncated)"):
        validate_checkpoint(ckpt)


def test_directory_named_like_a_shard_is_ignored_and_empty_dir_refused(tmp_path: Path, ckpt: Path) -> None:
    (ckpt / "extra.safetensors").mkdir()
    validate_checkpoint(ckpt)
    (ckpt / ST).unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors files"):
        validate_checkpoint(ckpt)


# --- tensor values: NaN / inf / out-of-range codes ----------------------------------------------------------

def _poison(name: str, value: float):
    def edit(tensors: dict) -> None:
        tensor = tensors[name].clone()
        tensor.view(-1)[3] = value
        tensors[name] = tensor
    return edit


@pytest.mark.parametrize("name,value", [(f"{Q}.scales", math.nan), (f"{Q}.salient_weight", math.inf),
                                        (f"{DOWN}.rot", -math.inf), ("model.embed_tokens.weight", math.nan),
                                        ("lm_head.weight", math.inf)])
def test_nan_or_inf_values_are_found_when_values_are_checked(ckpt: Path, monkeypatch, name: str, value) -> None:
    _rewrite(ckpt, _poison(name, value))
    validate_checkpoint(ckpt)  # the default reads headers only: cheap, and NaN needs the data
    with pytest.raises(CheckpointError, match=rf"{name} in model\.safetensors: 1 of \d+ values are NaN or "
                       "infinite. The checkpoint is corrupt"):
        validate_checkpoint(ckpt, check_values=True)
    monkeypatch.setenv("ROSAQ_CHECK_VALUES", "1")
    with pytest.raises(CheckpointError, match=name):
        validate_checkpoint(ckpt)


@pytest.mark.parametrize("name,value,match", [
    (f"{Q}.salient_idx", -5, "indices are not strictly ascending and non-negative"),
    (f"{Q}.salient_idx", 0, "indices are not strictly ascending"),
])
def test_out_of_range_codes_are_found_when_values_are_checked(ckpt: Path, name: str, value: int,
                                                              match: str) -> None:
    _rewrite(ckpt, _poison(name, value))
    validate_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match=f"{name} in model.safetensors: {match}"):
        validate_checkpoint(ckpt, check_values=True)


def test_plugin_hook_checks_values_before_loading_when_asked(ckpt: Path, monkeypatch) -> None:
    from rosaq_vllm.config import RosaqConfig

    _rewrite(ckpt, _poison(f"{Q}.scales", math.nan))
    RosaqConfig().maybe_update_config(str(ckpt))
    monkeypatch.setenv("ROSAQ_CHECK_VALUES", "1")
    with pytest.raises(CheckpointError, match=f"{Q}.scales in model.safetensors: 1 of"):
        RosaqConfig().maybe_update_config(str(ckpt))


@pytest.fixture
def rosaq_layer(monkeypatch):
    """A ROSAQ down_proj layer built by the plugin's linear method outside an engine (TP rank 0 of 1)."""
    import vllm.model_executor.parameter as parameter
    from vllm.model_executor.model_loader.weight_utils import default_weight_loader

    from rosaq_vllm.linear_method import RosaqLinearMethod

    monkeypatch.setattr(parameter, "get_tensor_model_parallel_rank", lambda: 0)
    monkeypatch.setattr(parameter, "get_tensor_model_parallel_world_size", lambda: 1)
    cfg = RosaqQuantConfig(group_size=32, num_salient=16, salient_fraction=None, rotation_block_size=64)
    method = RosaqLinearMethod(cfg, DOWN, ["down_proj"])
    layer = torch.nn.Module()
    method.create_weights(layer, 256, [128], 256, 128, torch.float32, weight_loader=default_weight_loader)
    valid = {"qweight": torch.zeros(128, 32, dtype=torch.int32), "scales": torch.ones(128, 8, dtype=torch.float16),
             "qzeros": pack_zeros(torch.randint(0, 16, (128, 8), dtype=torch.uint8), 4),
             "salient_idx": torch.arange(0, 256, 16, dtype=torch.int32),
             "salient_weight": torch.ones(128, 16, dtype=torch.float16), "rot": torch.eye(64).expand(4, 64, 64)}
    return method, layer, valid


@pytest.mark.parametrize("name", ["scales", "salient_weight", "rot"])
def test_plugin_loader_refuses_nan_in_float_tensors(rosaq_layer, name: str) -> None:
    _, layer, valid = rosaq_layer
    tensor = valid[name].clone()
    tensor.view(-1)[7] = math.nan
    param = getattr(layer, name)
    with pytest.raises(CheckpointError, match=f"{DOWN}.{name}: 1 of {tensor.numel()} values are NaN"):
        param.weight_loader(param, tensor)


def test_plugin_unpacks_the_zero_points(rosaq_layer) -> None:
    """The loader takes the packed int32 zero points (and refuses unpacked uint8 ones) and keeps them unpacked."""
    method, layer, valid = rosaq_layer
    with pytest.raises(CheckpointError, match=f"{DOWN}.qzeros: dtype torch.uint8, expected torch.int32"):
        layer.qzeros.weight_loader(layer.qzeros, unpack_zeros(valid["qzeros"], 4))
    for name, tensor in valid.items():
        param = getattr(layer, name)
        param.weight_loader(param, tensor)
    method.process_weights_after_loading(layer)
    assert layer.qzeros.dtype == torch.uint8
    assert torch.equal(layer.qzeros.data, unpack_zeros(valid["qzeros"], 4))


def test_plugin_loads_valid_tensors(rosaq_layer) -> None:
    method, layer, valid = rosaq_layer
    for name, tensor in valid.items():
        param = getattr(layer, name)
        param.weight_loader(param, tensor)
    method.process_weights_after_loading(layer)
    assert layer.salient_idx.shape == (16,)


# --- pickle-only checkpoints ----------------------------------------------------------------------------------

class _Canary:
    """Unpickling this creates a file: proof that nothing unpickled the checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture
def pickle_only(ckpt: Path, tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "unpickled"
    (ckpt / ST).unlink()
    (ckpt / "pytorch_model.bin").write_bytes(pickle.dumps({"weights": _Canary(marker)}))
    return ckpt, marker


def test_pickle_only_checkpoint_is_refused(pickle_only, monkeypatch) -> None:
    ckpt, marker = pickle_only
    monkeypatch.delenv("ROSAQ_ALLOW_PICKLE", raising=False)
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: pickle checkpoint: ROSAQ reads only "
                       r"safetensors and never unpickles .*Convert it to safetensors.*ROSAQ_ALLOW_PICKLE=1"):
        validate_checkpoint(ckpt)
    from rosaq_vllm.config import RosaqConfig

    with pytest.raises(CheckpointError, match="pickle checkpoint"):
        RosaqConfig().maybe_update_config(str(ckpt))
    assert not marker.exists()


def test_pickle_opt_in_skips_checks_but_never_unpickles(pickle_only, monkeypatch) -> None:
    ckpt, marker = pickle_only
    monkeypatch.setenv("ROSAQ_ALLOW_PICKLE", "1")

    def no_unpickling(*args, **kwargs):
        raise AssertionError("ROSAQ must never unpickle")

    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.warns(UserWarning, match="ROSAQ does not unpickle"):
        cfg = validate_checkpoint(ckpt, check_values=True)
    assert cfg.bits == 4
    assert not marker.exists()
    _edit_config(ckpt, lambda c: c["quantization_config"].update(bits=5))  # the config is still validated
    with pytest.raises(CheckpointError, match="bits"):
        validate_checkpoint(ckpt)


def test_opt_in_does_not_apply_when_safetensors_exist(ckpt: Path, monkeypatch) -> None:
    monkeypatch.setenv("ROSAQ_ALLOW_PICKLE", "1")
    (ckpt / "pytorch_model.bin").write_bytes(b"not read")
    _rewrite(ckpt, lambda t: t.pop(f"{DOWN}.rot"))
    with pytest.raises(CheckpointError, match=f"{DOWN}.rot: missing"):
        validate_checkpoint(ckpt)
