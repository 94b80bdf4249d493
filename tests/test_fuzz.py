"""Fuzzing the config parser and the checkpoint reader with hypothesis.

The property everywhere: bad input raises :class:`CheckpointError` (a ValueError naming the key or tensor) and
nothing else, and input that is accepted really works (a config round-trips; a safetensors file whose header
``read_safetensors_header`` accepts opens with the safetensors library and every tensor reads).
About 3,250 generated cases (plus hypothesis' shrinking on a failure); ~45 s on 2 cores.
"""

import copy
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from rosaq_vllm.checkpoint import (
    QUANTIZED_LINEARS,
    CheckpointError,
    RosaqQuantConfig,
    linear_tensor_specs,
    read_safetensors_header,
    validate_checkpoint,
)


def fuzz(examples: int) -> settings:
    """Fresh random cases locally; a fixed, reproducible set in CI (``CI=true``)."""
    return settings(max_examples=examples, deadline=None, derandomize=os.environ.get("CI") == "true",
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])

_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True)
            | st.text(max_size=12))
JSON = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=5)
#: Values close to valid ones, so the fuzzer reaches the checks behind the type checks.
NEAR = st.sampled_from([0, 1, 3, 4, 16, 32, 48, 64, 96, 128, 256, -1, 2**63, 0.0, 0.01, 0.5, 0.999, 1.0, 4.0,
                        float("nan"), float("inf"), True, None, "", "absorbed", "per-layer", "none", "rosaq", "4",
                        [], ["down_proj"], ["q_proj", "k_proj", "v_proj"], ["gate_proj", "up_proj"],
                        ["down_proj", "down_proj"], list(QUANTIZED_LINEARS), {}])
KEYS = st.sampled_from([*RosaqQuantConfig().to_dict(), "colour", ""]) | st.text(max_size=8)
VALID = st.builds(RosaqQuantConfig, bits=st.sampled_from([3, 4]), group_size=st.sampled_from([32, 64, 128]),
                  rotation=st.just("absorbed"), rotation_block_size=st.sampled_from([0, 32, 64]),
                  online_rotation=st.sampled_from([(), ("down_proj",), ("q_proj", "k_proj", "v_proj")]))


def _edits(keys, values):
    return st.lists(st.tuples(keys, st.none() | values), min_size=1, max_size=3)  # None value: delete the key


def _apply(base: dict, edits) -> dict:
    out = dict(base)
    for key, value in edits:
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value[0]
    return out


@fuzz(1200)
@given(base=VALID, edits=_edits(KEYS, st.tuples(NEAR | JSON)), top=st.none() | JSON)
def test_config_parser_raises_only_checkpoint_error(base: RosaqQuantConfig, edits, top) -> None:
    config = top if top is not None and not isinstance(top, dict) else _apply(base.to_dict(), edits)
    try:
        cfg = RosaqQuantConfig.from_dict(config)
    except CheckpointError:
        event("refused")
        return
    event("accepted")
    assert RosaqQuantConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    for projection in ("q_proj", "down_proj"):
        for in_features in (64, 128, 4096):
            try:
                linear_tensor_specs(cfg, projection, 128, in_features)
            except CheckpointError:
                pass


# --- the checkpoint reader, on mutations of a real (tiny) checkpoint ----------------------------------------

@pytest.fixture(scope="module")
def fuzz_dir(tiny_checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("fuzz") / "ckpt"
    shutil.copytree(tiny_checkpoint("llama"), work)
    return work


@pytest.fixture(scope="module")
def original(fuzz_dir: Path) -> dict:
    raw = (fuzz_dir / "model.safetensors").read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    return {"raw": raw, "header_len": header_len, "header": json.loads(raw[8:8 + header_len]),
            "config": (fuzz_dir / "config.json").read_bytes()}


def _accepts(path: Path) -> bool:
    """Run the reader; if it accepts the file, the safetensors library must read every tensor."""
    try:
        header = read_safetensors_header(path)
    except CheckpointError:
        event("refused")
        return False
    event("accepted")
    with safe_open(path, framework="pt") as f:
        assert set(f.keys()) == set(header)
        for name in f.keys():
            assert list(f.get_tensor(name).shape) == header[name]["shape"]
    return True


BYTE_OPS = st.lists(st.tuples(st.sampled_from(["set", "insert", "delete", "truncate", "length"]),
                              st.floats(0, 1), st.binary(min_size=1, max_size=4), st.integers(-64, 64)),
                    min_size=1, max_size=4)


def _mutate_bytes(raw: bytes, header_len: int, ops, in_header: bool) -> bytes:
    data = bytearray(raw)
    for op, where, blob, delta in ops:
        span = 8 + header_len if in_header else len(data)
        pos = min(int(where * span), max(len(data) - 1, 0))
        if op == "set":
            data[pos:pos + len(blob)] = blob
        elif op == "insert":
            data[pos:pos] = blob
        elif op == "delete":
            del data[pos:pos + abs(delta) + 1]
        elif op == "truncate":
            del data[pos:]
        else:
            data[:8] = struct.pack("<Q", max(header_len + delta, 0) if delta else int(where * 2**64) % 2**64)
    return bytes(data)


@fuzz(1000)
@given(ops=BYTE_OPS, in_header=st.booleans())
def test_header_reader_on_mutated_bytes(fuzz_dir: Path, original: dict, ops, in_header: bool) -> None:
    path = fuzz_dir.parent / "bytes.safetensors"
    path.write_bytes(_mutate_bytes(original["raw"], original["header_len"], ops, in_header))
    _accepts(path)


FIELD = st.sampled_from(["dtype", "shape", "data_offsets", "entry", "name", "metadata"])
FIELD_VALUES = NEAR | JSON | st.sampled_from(["F16", "F32", "BF16", "I32", "U8", "I64", "F64", "BOOL", "F8_E4M3",
                                              [0, 0], [1, 1], [0], [2**64 - 1], [2**64], [-1]])


@fuzz(800)
@given(edits=st.lists(st.tuples(st.floats(0, 0.999), FIELD, FIELD_VALUES), min_size=1, max_size=3),
       pad=st.sampled_from([b"", b" ", b"\n", b"\x00"]))
def test_header_reader_on_mutated_header_json(fuzz_dir: Path, original: dict, edits, pad: bytes) -> None:
    """Structure-aware: change one field of one entry (or its name, or the metadata), keep the length right."""
    header = json.loads(json.dumps(original["header"]))
    for where, field, shared_value in edits:
        value = copy.deepcopy(shared_value)  # hypothesis may hand the same object to two edits
        names = sorted(header)
        name = names[int(where * len(names))]
        if field == "entry":
            header[name] = value
        elif field == "name":
            header[str(value)] = header.pop(name)
        elif field == "metadata":
            header["__metadata__"] = value
        elif isinstance(header[name], dict):
            header[name][field] = value
    text = json.dumps(header).encode() + pad
    path = fuzz_dir.parent / "json.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + original["raw"][8 + original["header_len"]:])
    _accepts(path)


@fuzz(250)
@given(ops=BYTE_OPS, in_header=st.booleans(), config_edits=st.none() | _edits(
    st.sampled_from(["hidden_size", "vocab_size", "num_hidden_layers", "num_attention_heads", "head_dim",
                     "num_key_value_heads", "intermediate_size", "model_type", "tie_word_embeddings",
                     "attention_bias", "mlp_bias", "quantization_config"]), st.tuples(NEAR | JSON)))
def test_validate_checkpoint_on_mutated_checkpoints(fuzz_dir: Path, original: dict, ops, in_header: bool,
                                                    config_edits) -> None:
    """Mutated bytes of the data (NaN floats, bad codes), the header and config.json: CheckpointError or valid."""
    (fuzz_dir / "model.safetensors").write_bytes(
        _mutate_bytes(original["raw"], original["header_len"], ops, in_header))
    config = json.loads(original["config"])
    (fuzz_dir / "config.json").write_text(json.dumps(_apply(config, config_edits or [])))
    try:
        validate_checkpoint(fuzz_dir, check_values=True)
        event("accepted")
    except CheckpointError as exc:
        event(f"refused: {str(exc).split(':')[-2][-40:]}")
    finally:
        (fuzz_dir / "config.json").write_bytes(original["config"])
        (fuzz_dir / "model.safetensors").write_bytes(original["raw"])


def test_unmutated_checkpoint_is_valid(fuzz_dir: Path) -> None:
    assert validate_checkpoint(fuzz_dir, check_values=True).bits == 4
