"""The ROSAQ checkpoint format: the one module that defines, writes, reads and validates it.

``docs/checkpoint-format.md`` is the prose version of this module. A checkpoint is a Hugging Face
model directory whose ``config.json`` carries ``quantization_config`` (see :class:`RosaqQuantConfig`)
and whose safetensors shards hold, for every quantized projection ``<p>`` of every decoder layer,
the tensors of :func:`linear_tensor_specs`; everything else (embeddings, norms, biases, ``lm_head``)
is stored as in any Hugging Face checkpoint.

This module imports torch and safetensors only (never vLLM or transformers), so the quantizer,
the vLLM plugin and the tests share it.
"""

import dataclasses
import json
import math
import os
import shutil
import struct
import tempfile
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rosaq_kernels.packing import CHUNK_CHANNELS, packed_width
from safetensors import safe_open
from safetensors.torch import load_file, save_file

QUANT_METHOD = "rosaq"
FORMAT_VERSION = 2  # 2: zero points packed at the code width along the outputs (1: uint8 [N, K/g])
ROTATION_MODES = ("absorbed", "per-layer", "none")
QUANTIZED_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: Projections that read the same input: they must share rotation and salient channels.
SHARED_INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
SALIENT_MULTIPLE = 16
MAX_SHARD_BYTES = 2 * 1024**3
#: Pickle checkpoint files: never read by ROSAQ.
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")

#: safetensors dtype names of the tensors this format defines.
_ST_DTYPES = {
    torch.int32: "I32",
    torch.uint8: "U8",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
}
_FLOAT_ST_DTYPES = ("F16", "BF16", "F32")
_ST_ITEMSIZE = {"I32": 4, "U8": 1, "F16": 2, "BF16": 2, "F32": 4, "I64": 8, "F64": 8, "I8": 1, "I16": 2,
                "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class CheckpointError(ValueError):
    """A ROSAQ config or checkpoint is invalid; the message names the key or tensor and the fix."""


def _fail(what: str, problem: str, fix: str) -> CheckpointError:
    return CheckpointError(f"{what}: {problem}. {fix}")


@dataclass(frozen=True)
class RosaqQuantConfig:
    """``quantization_config`` of a ROSAQ checkpoint (serialised by :meth:`to_dict`).

    Attributes:
        bits: 3 or 4, width of the quantized codes.
        group_size: input channels per scale / zero point (asymmetric quantization).
        num_salient: salient (full-precision) input channels per linear, or ``None`` to use
            ``salient_fraction``; rounded to a multiple of 16 by :meth:`num_salient_for`.
        salient_fraction: fraction of each linear's input channels kept salient.
        rotation: ``absorbed``, ``per-layer`` or ``none`` (how the quantizer rotated the model).
        rotation_block_size: block size of the online block-diagonal rotations; 0 means one
            block spanning the whole input.
        online_rotation: projections that carry an online rotation tensor ``rot``.
    """

    bits: int = 4
    group_size: int = 128
    num_salient: int | None = None
    salient_fraction: float | None = 0.01
    rotation: str = "absorbed"
    rotation_block_size: int = 128
    online_rotation: tuple[str, ...] = ("down_proj",)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        self._check_int("bits", self.bits, allowed=(3, 4))
        self._check_int("group_size", self.group_size, minimum=32)
        if self.group_size % 32:
            raise _fail("quantization_config.group_size", f"{self.group_size} is not a multiple of 32",
                        "Use 32, 64, 128 or 256 (the packed INT3/INT4 chunks span 32 channels).")
        self._check_int("format_version", self.format_version)
        if self.format_version != FORMAT_VERSION:
            raise _fail("quantization_config.format_version",
                        f"version {self.format_version} is not supported (this rosaq-vllm reads {FORMAT_VERSION})",
                        "Upgrade rosaq-vllm or re-quantize the model with this version of rosaq-quantize.")
        if (self.num_salient is None) == (self.salient_fraction is None):
            raise _fail("quantization_config.num_salient / salient_fraction",
                        "exactly one of the two must be set", "Set one and make the other null.")
        if self.num_salient is not None:
            self._check_int("num_salient", self.num_salient, minimum=0)
        if self.salient_fraction is not None:
            frac = self.salient_fraction
            if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 <= frac < 1:
                raise _fail("quantization_config.salient_fraction", f"{frac!r} is not a number in [0, 1)",
                            "Use e.g. 0.01 for 1% of the input channels.")
        if self.rotation not in ROTATION_MODES:
            raise _fail("quantization_config.rotation", f"unknown mode {self.rotation!r}",
                        f"Use one of {ROTATION_MODES}.")
        self._check_int("rotation_block_size", self.rotation_block_size, minimum=0)
        if not isinstance(self.online_rotation, tuple) or any(
                p not in QUANTIZED_LINEARS for p in self.online_rotation):
            raise _fail("quantization_config.online_rotation", f"{self.online_rotation!r} is not a list of "
                        f"projection names", f"Use names from {QUANTIZED_LINEARS}.")
        for group in SHARED_INPUT_GROUPS:
            if len({p in self.online_rotation for p in group}) > 1:
                raise _fail("quantization_config.online_rotation", f"{group} read the same input but only some "
                            "of them are listed", "List all or none of them.")
        if len(set(self.online_rotation)) != len(self.online_rotation):
            raise _fail("quantization_config.online_rotation", f"{list(self.online_rotation)} lists a projection "
                        "twice", "List each projection once.")
        if self.rotation == "none" and self.online_rotation:
            raise _fail("quantization_config.online_rotation", "rotation is 'none' but online rotations are "
                        "listed", "Use an empty list with rotation 'none'.")

    @staticmethod
    def _check_int(key: str, value: Any, minimum: int | None = None, allowed: tuple[int, ...] = ()) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(f"quantization_config.{key}", f"{value!r} is not an integer", "Write an integer.")
        if allowed and value not in allowed:
            raise _fail(f"quantization_config.{key}", f"{value} is not supported", f"Use one of {allowed}.")
        if minimum is not None and value < minimum:
            raise _fail(f"quantization_config.{key}", f"{value} is below {minimum}", f"Use a value >= {minimum}.")

    def to_dict(self) -> dict[str, Any]:
        """The ``quantization_config`` dict written into ``config.json``."""
        d = dataclasses.asdict(self)
        d["online_rotation"] = list(self.online_rotation)
        return {"quant_method": QUANT_METHOD, **d}

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "RosaqQuantConfig":
        """Parse and validate a ``quantization_config`` dict; unknown keys are errors."""
        if not isinstance(config, Mapping):
            raise _fail("quantization_config", f"expected a JSON object, got {type(config).__name__}",
                        "Re-quantize the model with rosaq-quantize.")
        method = str(config.get("quant_method", QUANT_METHOD)).lower()
        if method != QUANT_METHOD:
            raise _fail("quantization_config.quant_method", f"{method!r} is not {QUANT_METHOD!r}",
                        "This checkpoint is not a ROSAQ checkpoint.")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in config.items() if k != "quant_method"}
        unknown = sorted(set(kwargs) - known, key=str)
        if unknown:
            raise _fail(f"quantization_config.{unknown[0]}", "unknown key", f"Known keys: {sorted(known)}.")
        if "format_version" not in kwargs:
            raise _fail("quantization_config.format_version", "missing", "Re-quantize with rosaq-quantize.")
        if "online_rotation" in kwargs:
            rot = kwargs["online_rotation"]
            if not isinstance(rot, (list, tuple)):
                raise _fail("quantization_config.online_rotation", f"{rot!r} is not a list",
                            f"Use a list of names from {QUANTIZED_LINEARS}.")
            kwargs["online_rotation"] = tuple(rot)
        return cls(**kwargs)

    def num_salient_for(self, in_features: int) -> int:
        """Salient channels of a linear with ``in_features`` inputs: a multiple of 16, below ``in_features``."""
        if self.num_salient is not None:
            count = self.num_salient
        else:
            count = self.salient_fraction * in_features
        count = SALIENT_MULTIPLE * int(math.floor(count / SALIENT_MULTIPLE + 0.5))
        if count >= in_features:
            raise _fail("quantization_config.num_salient", f"{count} salient channels leave nothing to quantize "
                        f"in a linear with {in_features} inputs", "Choose fewer salient channels.")
        return count

    def rotation_block_for(self, projection: str, in_features: int) -> int | None:
        """Block size of ``projection``'s online rotation, or ``None`` if it has none."""
        if projection not in self.online_rotation:
            return None
        block = self.rotation_block_size or in_features
        if in_features % block:
            raise _fail("quantization_config.rotation_block_size", f"{block} does not divide the {in_features} "
                        f"inputs of {projection}", "Re-quantize with a block size that divides it.")
        return block


@dataclass(frozen=True)
class TensorSpec:
    """Expected shape and dtype of one checkpoint tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype


def linear_tensor_specs(
    cfg: RosaqQuantConfig, projection: str, out_features: int, in_features: int
) -> dict[str, TensorSpec]:
    """Tensors of one quantized projection, keyed by suffix (``<prefix>.<suffix>`` in the checkpoint).

    * ``qweight`` int32 ``[N, packed_width(K, bits)]``: codes, packed along the input (``rosaq_kernels.packing``).
    * ``scales`` float16 ``[N, K // group_size]``.
    * ``qzeros`` int32 ``[K // group_size, packed_width(N, bits)]``: zero points packed along the outputs
      (``rosaq_kernels.packing.pack_zeros``), so ``N`` must be a multiple of 8 (INT4) or 32 (INT3).
    * ``salient_idx`` int32 ``[S]``: ascending input channels kept in full precision (their codes equal
      the zero point, so the quantized part contributes 0 there).
    * ``salient_weight`` float16 ``[N, S]``.
    * ``rot`` float32 ``[K // B, B, B]``: online block rotation applied to the input (only some projections).
    """
    if in_features % cfg.group_size:
        raise _fail(f"{projection}", f"{in_features} input channels are not divisible by group_size "
                    f"{cfg.group_size}", "Quantize with a group size that divides every linear's input.")
    groups = in_features // cfg.group_size
    if out_features % CHUNK_CHANNELS[cfg.bits]:
        raise _fail(f"{projection}", f"{out_features} outputs are not a multiple of {CHUNK_CHANNELS[cfg.bits]}, "
                    f"which INT{cfg.bits} zero-point packing needs", "Use 4 bits, or a model with such widths.")
    num_salient = cfg.num_salient_for(in_features)
    specs = {
        "qweight": TensorSpec((out_features, packed_width(in_features, cfg.bits)), torch.int32),
        "scales": TensorSpec((out_features, groups), torch.float16),
        "qzeros": TensorSpec((groups, packed_width(out_features, cfg.bits)), torch.int32),
        "salient_idx": TensorSpec((num_salient,), torch.int32),
        "salient_weight": TensorSpec((out_features, num_salient), torch.float16),
    }
    block = cfg.rotation_block_for(projection, in_features)
    if block is not None:
        specs["rot"] = TensorSpec((in_features // block, block, block), torch.float32)
    return specs


def _config_int(hf_config: Mapping[str, Any], key: str, default: int | None = None) -> int:
    value = hf_config.get(key, default)
    if value is None or isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _fail(f"config.json {key}", f"{value!r} is not a positive integer", "Fix the model's config.json.")
    return value


def linear_shapes(hf_config: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """``(out_features, in_features)`` of every quantized projection of a Llama / Qwen2 / Mistral layer."""
    model_type = hf_config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise _fail("config.json model_type", f"{model_type!r} is not supported",
                    f"ROSAQ supports {SUPPORTED_MODEL_TYPES}.")
    hidden = _config_int(hf_config, "hidden_size")
    heads = _config_int(hf_config, "num_attention_heads")
    kv_heads = _config_int(hf_config, "num_key_value_heads", heads)
    head_dim = _config_int(hf_config, "head_dim", hidden // heads)
    inter = _config_int(hf_config, "intermediate_size")
    return {
        "q_proj": (heads * head_dim, hidden),
        "k_proj": (kv_heads * head_dim, hidden),
        "v_proj": (kv_heads * head_dim, hidden),
        "o_proj": (hidden, heads * head_dim),
        "gate_proj": (inter, hidden),
        "up_proj": (inter, hidden),
        "down_proj": (hidden, inter),
    }


def projection_prefix(layer: int, projection: str) -> str:
    """Hugging Face module name of a projection, e.g. ``model.layers.3.self_attn.q_proj``."""
    block = "mlp" if projection in ("gate_proj", "up_proj", "down_proj") else "self_attn"
    return f"model.layers.{layer}.{block}.{projection}"


def _bias_projections(hf_config: Mapping[str, Any]) -> tuple[str, ...]:
    if hf_config.get("model_type") == "qwen2":
        return ("q_proj", "k_proj", "v_proj")
    names: tuple[str, ...] = ()
    if hf_config.get("attention_bias"):
        names += ("q_proj", "k_proj", "v_proj", "o_proj")
    if hf_config.get("mlp_bias"):
        names += ("gate_proj", "up_proj", "down_proj")
    return names


def expected_tensors(hf_config: Mapping[str, Any], cfg: RosaqQuantConfig) -> dict[str, TensorSpec]:
    """Every tensor a checkpoint for ``hf_config`` must hold.

    Unquantized tensors (embeddings, norms, biases, ``lm_head``) may be stored in any float dtype;
    their spec carries float32 as a placeholder and only their shape is binding.
    """
    hidden = _config_int(hf_config, "hidden_size")
    vocab = _config_int(hf_config, "vocab_size")
    layers = _config_int(hf_config, "num_hidden_layers")
    shapes = linear_shapes(hf_config)
    float_dtype = torch.float32
    specs: dict[str, TensorSpec] = {"model.embed_tokens.weight": TensorSpec((vocab, hidden), float_dtype),
                                           "model.norm.weight": TensorSpec((hidden,), float_dtype)}
    if not hf_config.get("tie_word_embeddings", False):
        specs["lm_head.weight"] = TensorSpec((vocab, hidden), float_dtype)
    biased = _bias_projections(hf_config)
    for layer in range(layers):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            specs[f"model.layers.{layer}.{norm}.weight"] = TensorSpec((hidden,), float_dtype)
        for projection, (out_features, in_features) in shapes.items():
            prefix = projection_prefix(layer, projection)
            for suffix, spec in linear_tensor_specs(cfg, projection, out_features, in_features).items():
                specs[f"{prefix}.{suffix}"] = spec
            if projection in biased:
                specs[f"{prefix}.bias"] = TensorSpec((out_features,), float_dtype)
    return specs


def _is_float_slot(name: str) -> bool:
    return not name.endswith((".qweight", ".scales", ".qzeros", ".salient_idx", ".salient_weight", ".rot"))


#: Header size limit of the safetensors library.
_MAX_HEADER_BYTES = 100_000_000
_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}


def _is_u64(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**64


def _nbytes(shape: list[int], dtype: str) -> int | None:
    """Bytes of a tensor, or ``None`` where the safetensors library's u64 arithmetic would overflow."""
    count = _ST_ITEMSIZE[dtype]
    for dim in shape:
        count *= dim
        if count >= 2**64:
            return None
    return count


def read_safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """Tensor entries (``dtype``, ``shape``, ``data_offsets``) of a safetensors file, without loading data.

    Applies the rules of the safetensors library itself (a JSON object after the 8-byte length, known
    dtypes, non-negative integer shapes, data of each tensor contiguous, the data section exactly filled),
    so a file that passes here is one ``safetensors`` opens. Raises :class:`CheckpointError` otherwise.
    """
    fix = "Re-copy the checkpoint or re-quantize the model."
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _fail(str(path), "file is too short to be safetensors", fix)
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(size - 8, _MAX_HEADER_BYTES):
                raise _fail(str(path), "corrupt or truncated safetensors header (its length field points beyond "
                             "the file)", fix)
            raw = f.read(header_len)
    except OSError as exc:
        raise _fail(str(path), f"cannot be read ({exc})", "Check the path and file permissions.") from exc
    if not raw.startswith(b"{"):
        raise _fail(str(path), "corrupt safetensors header (not a JSON object)", fix)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise _fail(str(path), f"corrupt safetensors header ({type(exc).__name__})", fix) from exc
    if not isinstance(header, dict):
        raise _fail(str(path), "corrupt safetensors header (not a JSON object)", fix)
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(v, str) for v in metadata.values())):
        raise _fail(f"__metadata__ in {path.name}", "not a map of strings", fix)
    data_size = size - 8 - header_len
    spans = []
    for name, entry in header.items():
        where = f"{name} in {path.name}"
        if not isinstance(entry, dict) or set(entry) != _ENTRY_KEYS:
            raise _fail(where, f"corrupt header entry (not an object with keys {sorted(_ENTRY_KEYS)})", fix)
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _ST_ITEMSIZE:
            raise _fail(where, f"corrupt header entry (unknown dtype {dtype!r})", fix)
        if not isinstance(shape, list) or not all(_is_u64(d) for d in shape):
            raise _fail(where, f"corrupt header entry (shape {shape!r} is not a list of sizes)", fix)
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_u64(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise _fail(where, f"corrupt header entry (data_offsets {offsets!r})", fix)
        begin, end = offsets
        if end > data_size:
            raise _fail(where, f"data ends at byte {end} but the file holds {data_size} bytes of data "
                        "(truncated or corrupt file)", fix)
        if end - begin != _nbytes(shape, dtype):
            raise _fail(where, f"{end - begin} data bytes do not hold a {dtype} tensor of shape {tuple(shape)}",
                        fix)
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise _fail(f"{name} in {path.name}", f"data starts at byte {begin}, expected {position} (overlapping "
                        "or non-contiguous tensors)", fix)
        position = end
    if position != data_size:
        raise _fail(str(path), f"{data_size - position} bytes after the last tensor (corrupt file)", fix)
    return header


def _pickle_files(model_dir: Path) -> list[Path]:
    return sorted(p for pattern in PICKLE_PATTERNS for p in model_dir.glob(pattern))


def pickle_allowed() -> bool:
    """Whether the user opted in (``ROSAQ_ALLOW_PICKLE=1``) to let vLLM load a pickle-only checkpoint."""
    return os.environ.get("ROSAQ_ALLOW_PICKLE", "") == "1"


def safetensors_files(model_dir: Path) -> list[Path]:
    """The safetensors shards of a model directory (pickle checkpoints are not read)."""
    files = sorted(p for p in model_dir.glob("*.safetensors") if p.is_file())
    if not files:
        pickles = _pickle_files(model_dir)
        if pickles:
            raise _fail(str(pickles[0]), "pickle checkpoint: ROSAQ reads only safetensors and never unpickles "
                        "(unpickling can run arbitrary code)", "Convert it to safetensors (e.g. load it where you "
                        "trust it and save with safetensors.torch.save_file), or re-run rosaq-quantize. To let vLLM "
                        "load it anyway with torch.load(weights_only=True) and no checks before loading, set "
                        "ROSAQ_ALLOW_PICKLE=1.")
        raise _fail(str(model_dir), "no *.safetensors files", "A ROSAQ checkpoint is written by rosaq-quantize.")
    return files


def load_config(model_dir: Path) -> tuple[dict[str, Any], RosaqQuantConfig]:
    """Read ``config.json`` and parse its ``quantization_config``."""
    path = model_dir / "config.json"
    if not path.is_file():
        raise _fail(str(model_dir), "no config.json", "Point to a directory written by rosaq-quantize.")
    try:
        hf_config = json.loads(path.read_text())
    except (ValueError, RecursionError) as exc:
        raise _fail(str(path), f"not valid JSON ({type(exc).__name__}: {exc})", "Re-quantize the model.") from exc
    if not isinstance(hf_config, dict):
        raise _fail(str(path), f"expected a JSON object, got {type(hf_config).__name__}", "Re-quantize the model.")
    if "quantization_config" not in hf_config:
        raise _fail(str(path), "no quantization_config", "This is not a ROSAQ checkpoint; run rosaq-quantize.")
    return hf_config, RosaqQuantConfig.from_dict(hf_config["quantization_config"])


def _check_index(model_dir: Path, found: Mapping[str, tuple[dict[str, Any], str]]) -> None:
    """``model.safetensors.index.json``, if present, must map every tensor to the shard that holds it."""
    path = model_dir / "model.safetensors.index.json"
    if not path.is_file():
        return
    fix = "Re-copy the checkpoint (a shard may be missing) or re-quantize the model."
    try:
        weight_map = json.loads(path.read_text()).get("weight_map")
    except (ValueError, RecursionError, AttributeError) as exc:
        raise _fail(str(path), f"not a JSON object with a weight_map ({type(exc).__name__})", fix) from exc
    if not isinstance(weight_map, dict):
        raise _fail(f"weight_map in {path.name}", "not a JSON object", fix)
    for name, file in weight_map.items():
        if name not in found:
            raise _fail(name, f"listed in {path.name} (in {file!r}) but missing from the checkpoint", fix)
        if found[name][1] != file:
            raise _fail(f"{name} in {found[name][1]}", f"{path.name} places it in {file!r}", fix)
    unlisted = sorted(set(found) - set(weight_map))
    if unlisted:
        raise _fail(f"{unlisted[0]} in {found[unlisted[0]][1]}", f"not listed in {path.name}", fix)


def check_tensor_values(name: str, tensor: torch.Tensor) -> None:
    """Raise :class:`CheckpointError` if a float tensor holds NaN or infinity."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise _fail(name, f"{bad} of {tensor.numel()} values are NaN or infinite",
                    "The checkpoint is corrupt or was quantized from a diverged model; re-quantize it.")


def validate_checkpoint(model_dir: str | Path, check_values: bool | None = None) -> RosaqQuantConfig:
    """Check a checkpoint directory against its config, by default without loading tensor data.

    Every missing, extra, mis-shaped, wrongly-typed or truncated tensor raises :class:`CheckpointError`
    naming the tensor and the fix. With ``check_values`` (default: environment ``ROSAQ_CHECK_VALUES=1``)
    every tensor is also streamed once (safetensors ``safe_open``, one tensor in memory at a time) and
    NaN / infinite floats and invalid salient indices are errors (packed zero points always fit).

    A directory with only pickle files (``*.bin``, ``*.pt``) is refused unless ``ROSAQ_ALLOW_PICKLE=1``;
    then nothing can be checked before loading (ROSAQ never unpickles), a warning says so, and the
    configuration alone is validated.
    """
    model_dir = Path(model_dir)
    hf_config, cfg = load_config(model_dir)
    if pickle_allowed() and not any(model_dir.glob("*.safetensors")) and _pickle_files(model_dir):
        warnings.warn(f"{model_dir}: ROSAQ_ALLOW_PICKLE=1 and only pickle files: ROSAQ does not unpickle, so the "
                      "tensors are not checked before vLLM loads them (torch.load(weights_only=True)).",
                      stacklevel=2)
        for projection, (out_features, in_features) in linear_shapes(hf_config).items():
            linear_tensor_specs(cfg, projection, out_features, in_features)
        return cfg
    found: dict[str, tuple[dict[str, Any], str]] = {}
    for path in safetensors_files(model_dir):
        for name, entry in read_safetensors_header(path).items():
            if name in found:
                raise _fail(f"{name} in {path.name}", f"also stored in {found[name][1]}", "Re-quantize the model.")
            found[name] = (entry, path.name)
    fix = "The checkpoint does not match its config.json; re-run rosaq-quantize for this model."
    last_layer = f"model.layers.{_config_int(hf_config, 'num_hidden_layers') - 1}.input_layernorm.weight"
    if last_layer not in found:  # before listing every expected tensor of a (maybe absurd) layer count
        raise _fail(last_layer, f"missing from the checkpoint (config.json num_hidden_layers is "
                    f"{hf_config['num_hidden_layers']})", fix)
    expected = expected_tensors(hf_config, cfg)
    for name, spec in expected.items():
        if name not in found:
            raise _fail(name, "missing from the checkpoint", fix)
        entry, file = found[name]
        if tuple(entry["shape"]) != spec.shape:
            raise _fail(f"{name} in {file}", f"shape {tuple(entry['shape'])}, expected {spec.shape}", fix)
        if _is_float_slot(name):
            if entry["dtype"] not in _FLOAT_ST_DTYPES:
                raise _fail(f"{name} in {file}", f"dtype {entry['dtype']}, expected a float dtype", fix)
        elif entry["dtype"] != _ST_DTYPES[spec.dtype]:
            raise _fail(f"{name} in {file}", f"dtype {entry['dtype']}, expected {_ST_DTYPES[spec.dtype]}", fix)
    extra = sorted(set(found) - set(expected))
    if extra:
        raise _fail(f"{extra[0]} in {found[extra[0]][1]}", "unexpected tensor (not part of this model's ROSAQ "
                    "format)", fix)
    _check_index(model_dir, found)
    if check_values if check_values is not None else os.environ.get("ROSAQ_CHECK_VALUES", "") == "1":
        for path in safetensors_files(model_dir):
            _check_values(path)
    return cfg


def _check_values(path: Path) -> None:
    with safe_open(path, framework="pt") as f:
        for name in f.keys():
            tensor = f.get_tensor(name)
            check_tensor_values(f"{name} in {path.name}", tensor)
            if name.endswith(".salient_idx") and tensor.numel() and (
                    int(tensor.min()) < 0 or bool((tensor.diff() <= 0).any())):
                raise _fail(f"{name} in {path.name}", "indices are not strictly ascending and non-negative",
                            "The checkpoint is corrupt; re-quantize it.")


def load_tensors(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a validated checkpoint, on CPU."""
    model_dir = Path(model_dir)
    validate_checkpoint(model_dir)
    tensors: dict[str, torch.Tensor] = {}
    for path in safetensors_files(model_dir):
        tensors.update(load_file(path))
    return tensors


def _shard(tensors: Mapping[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += nbytes
    return shards


def write_tensors(out_dir: Path, tensors: Mapping[str, torch.Tensor], max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Write sharded safetensors (+ ``model.safetensors.index.json`` when there are several shards)."""
    shards = _shard(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], out_dir / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out_dir / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def atomic_output_dir(out_dir: Path, write: Callable[[Path], None], overwrite: bool = False) -> None:
    """Run ``write(tmp_dir)`` in a temporary sibling directory, validate it, then move it to ``out_dir``.

    Nothing is left at ``out_dir`` unless the whole write and the validation succeeded.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass --overwrite to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        write(tmp)
        validate_checkpoint(tmp)
        if out_dir.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, trash / "old")
            os.replace(tmp, out_dir)
            shutil.rmtree(trash)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_config(out_dir: Path, hf_config: Mapping[str, Any], cfg: RosaqQuantConfig) -> None:
    """Write ``config.json`` with ``quantization_config`` (untied embeddings: ROSAQ stores its own lm_head)."""
    config = dict(hf_config)
    config["quantization_config"] = cfg.to_dict()
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
