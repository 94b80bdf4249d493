"""Accuracy sweeps: calibrate and rotate once per rotation mode, quantize at many (bits, K, rounding) points,
and measure perplexity on held-out text, caching every row in a JSON file so re-runs skip finished rows.

A row's quantized model is built from exactly the tensors ``rosaq-quantize`` would write (same rotation,
salient selection, grid and packing); it is evaluated with dense effective weights
(:func:`evaluate.model_from_tensors` with ``dense=True``), which computes the checkpoint's function up to
float32 rounding. Average bits per weight are counted from those tensors.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from offline_quantizer.calibration import token_batches
from offline_quantizer.evaluate import model_from_tensors, token_nll
from offline_quantizer.multiple_choice import accuracy
from offline_quantizer.pipeline import (
    OUTLIER_RATIO,
    QuantizeOptions,
    RotatedLinear,
    _hf_dtype,
    _is_dense,
    prepare_model,
    quantize_model,
    quantize_rotated_linear,
    rotate_layers,
)
from rosaq_vllm.checkpoint import QUANTIZED_LINEARS, RosaqQuantConfig, projection_prefix

logger = logging.getLogger(__name__)

FP_ROW = "fp16"
#: per-position NLL bins reported: predictions of window positions [lo, hi)
POSITION_BINS = ((1, 2), (2, 4), (4, 16), (16, 128), (128, None))


@dataclass(frozen=True)
class GridPoint:
    """One quantized configuration. ``salient``: fraction (< 1) or count, as ``--salient``."""

    rotation: str
    bits: int
    group_size: int
    salient: float
    gptq: bool = False
    act_order: bool = False  # GPTQ columns by decreasing second moment (QuantizeOptions.act_order)
    sequential: bool = False  # calibrated on the quantized earlier layers (QuantizeOptions.sequential)
    complement: str = "pca"  # basis of the quantized channels (QuantizeOptions.complement)
    clip: bool = False  # clip-searched group ranges (QuantizeOptions.clip)
    seed: int = 0  # of a mixed complement's random matrices (QuantizeOptions.seed)
    sink_weight: float = 1.0  # of each calibration window's first token in the moments (QuantizeOptions.sink_weight)
    outlier_ratio: float = OUTLIER_RATIO  # massive-activation channels keep their axis (QuantizeOptions.outlier_ratio)
    online_rotation: bool = True  # absorbed: down_proj's input rotated online (QuantizeOptions.online_rotation)

    @property
    def key(self) -> str:
        k = f"{self.salient:g}"
        key = f"{self.rotation}|w{self.bits}g{self.group_size}|k{k}|{'gptq' if self.gptq else 'rtn'}"
        return (key + ("|ao" if self.act_order else "") + ("|seq" if self.sequential else "")
                + {"pca": "", "random": "|mix", "random-except-vo": "|mix-novo"}[self.complement]
                + ("|clip" if self.clip else "") + (f"|seed{self.seed}" if self.seed else "")
                + (f"|sinkL{self.sink_weight:g}" if self.sink_weight != 1.0 else "")
                + (f"|or{self.outlier_ratio:g}" if self.outlier_ratio != OUTLIER_RATIO else "")
                + ("" if self.online_rotation else "|no-online"))

    @property
    def own_calibration(self) -> bool:
        """Whether the row needs its own calibration pass: sequential rows calibrate on their own quantized
        layers, a mixed complement depends on K (its rotations cannot be shared with other rows), and the shared
        calibration weighs every token alike, keeps the default outlier axes and rotates down_proj online."""
        return (self.sequential or self.complement != "pca" or self.sink_weight != 1.0
                or self.outlier_ratio != OUTLIER_RATIO or not self.online_rotation)

    def options(self, block_size: int) -> QuantizeOptions:
        return QuantizeOptions(bits=self.bits, group_size=self.group_size, salient=self.salient,
                               rotation=self.rotation, block_size=block_size, gptq=self.gptq,
                               act_order=self.act_order, sequential=self.sequential, complement=self.complement,
                               clip=self.clip, seed=self.seed, sink_weight=self.sink_weight,
                               outlier_ratio=self.outlier_ratio, online_rotation=self.online_rotation)


def grid_points(
    rotations: Iterable[str], bits: Iterable[int], group_size: int, salient: Iterable[float], gptq: Iterable[bool],
    act_order: bool = False, sequential: bool = False, complement: str = "pca", clip: bool = False, seed: int = 0,
    sink_weight: float = 1.0, outlier_ratio: float = OUTLIER_RATIO, online_rotation: bool = True,
) -> list[GridPoint]:
    """Every combination of the arguments as grid points: activation order only on GPTQ rows, the ``complement``
    and its ``seed`` only on rotated rows (the original space has no basis to mix), ``online_rotation=False`` only
    on absorbed rows (the other modes have no online rotation to drop, or nothing but online ones)."""
    return [
        GridPoint(r, b, group_size, k, g, g and act_order, sequential, complement if r != "none" else "pca", clip,
                  seed if r != "none" else 0, sink_weight, outlier_ratio, online_rotation or r != "absorbed")
        for r in rotations for b in bits for k in salient for g in gptq
    ]


@dataclass
class RotatedModel:
    """A model folded, calibrated and rotated, every projection in its final basis, not yet quantized."""

    hf_config: dict
    dense: dict[str, torch.Tensor]
    linears: dict[str, RotatedLinear] = field(default_factory=dict)
    rotation: str = "absorbed"
    block_size: int = 128
    damping: float = 0.01


def _load_for_calibration(
    model_dir: str | Path, calibration_text: str, num_samples: int, seq_len: int, batch_size: int, device: str,
) -> tuple[torch.nn.Module, list[torch.Tensor], torch.dtype, dict]:
    """``(float32 model on device, calibration batches, the model's stored dtype, its config for the checkpoint)``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    seq_len = min(seq_len, getattr(model.config, "max_position_embeddings", seq_len))
    batches = token_batches(tokenizer, calibration_text, num_samples, seq_len, batch_size)
    hf_config = model.config.to_dict()
    hf_config.pop("quantization_config", None)
    hf_config["tie_word_embeddings"] = False
    return model, batches, _hf_dtype(model.config), hf_config


@torch.no_grad()
def rotate_for_grid(
    model_dir: str | Path, calibration_text: str, rotation: str, num_samples: int, seq_len: int,
    batch_size: int = 8, block_size: int = 128, full_moments: bool = False, device: str = "cpu",
) -> RotatedModel:
    """Fold, calibrate and rotate ``model_dir`` (see :func:`pipeline.prepare_model`) once.

    ``full_moments`` records the full second moment of every site (needed for GPTQ rounding).
    """
    model, batches, dtype, hf_config = _load_for_calibration(model_dir, calibration_text, num_samples, seq_len,
                                                              batch_size, device)
    opts = QuantizeOptions(rotation=rotation, block_size=block_size, gptq=full_moments)
    adapter, inputs, _ = prepare_model(model, batches, opts)
    result = RotatedModel(hf_config, {}, rotation=rotation, block_size=block_size, damping=opts.damping)

    def keep(index: int, projections: dict[str, RotatedLinear]) -> None:
        hessians: dict[int, torch.Tensor] = {}
        for name, rotated in projections.items():
            hessian = rotated.hessian
            if hessian is not None:  # shared by the projections of one site: store once
                hessian = hessians.setdefault(id(rotated.hessian), rotated.hessian.cpu())
            result.linears[projection_prefix(index, name)] = RotatedLinear(
                rotated.weight.cpu(), None if rotated.rot is None else rotated.rot.cpu(), rotated.energy.cpu(),
                hessian)
        for name, tensor in adapter.layers[index].state_dict().items():
            if _is_dense(name):
                result.dense[f"model.layers.{index}.{name}"] = tensor.detach().to(dtype).cpu()

    rotate_layers(adapter, inputs, opts, keep)
    for name, tensor in model.state_dict().items():
        if not name.startswith("model.layers.") and _is_dense(name):
            result.dense[name] = tensor.detach().to(dtype).cpu()
    return result


def quantize_rotated(rotated: RotatedModel, point: GridPoint, device: str = "cpu"
                     ) -> tuple[RosaqQuantConfig, dict[str, torch.Tensor]]:
    """The checkpoint tensors (and quantization config) of ``rotated`` quantized at ``point``."""
    if point.own_calibration:
        raise ValueError(f"row {point.key} needs its own calibration: quantize_full")
    opts = dataclasses.replace(point.options(rotated.block_size), damping=rotated.damping)
    tensors = dict(rotated.dense)
    for prefix, linear in rotated.linears.items():
        on_device = dataclasses.replace(linear, weight=linear.weight.to(device))
        for suffix, tensor in quantize_rotated_linear(on_device, opts).items():
            tensors[f"{prefix}.{suffix}"] = tensor
    return opts.quant_config(), tensors


@torch.no_grad()
def quantize_full(model_dir: str | Path, calibration_text: str, point: GridPoint, num_samples: int,
                        seq_len: int, batch_size: int = 8, block_size: int = 128, device: str = "cpu"
                        ) -> tuple[dict, RosaqQuantConfig, dict[str, torch.Tensor]]:
    """``(hf_config, quantization config, checkpoint tensors)`` of a row with its own calibration
    (:attr:`GridPoint.own_calibration`): a full :func:`pipeline.quantize_model` pass, nothing shared."""
    model, batches, dtype, hf_config = _load_for_calibration(model_dir, calibration_text, num_samples, seq_len,
                                                              batch_size, device)
    opts = point.options(block_size)
    return hf_config, opts.quant_config(), quantize_model(model, batches, opts, dtype)


def checkpoint_bits(tensors: dict[str, torch.Tensor], bits: int) -> dict:
    """Average stored bits per weight of the quantized projections, counted from the tensors.

    ``bits``: codes (full width), fp16 scales, zero points (packed at the code width), fp16 salient columns
    and their int32 indices; ``bits_with_rot`` adds the float32 online rotations. Biases are left out, as in
    ``benchmarks/llmc_baseline.py``'s count of AWQ/GPTQ checkpoints. ``salient``: the salient counts per
    input width (``{K: [S, ...]}``, distinct values).
    """
    weights = stored = rot = 0
    salient: dict[int, set[int]] = {}
    for name, tensor in tensors.items():
        prefix, _, suffix = name.rpartition(".")
        if prefix.rsplit(".", 1)[-1] not in QUANTIZED_LINEARS or suffix == "bias":
            continue
        nbytes = tensor.numel() * tensor.element_size()
        if suffix == "rot":
            rot += nbytes
            continue
        stored += nbytes
        if suffix == "qweight":
            in_features = tensor.shape[1] * 32 // bits
            weights += tensor.shape[0] * in_features
            salient.setdefault(in_features, set()).add(tensors[f"{prefix}.salient_idx"].numel())
    return {"bits": 8 * stored / weights, "bits_with_rot": 8 * (stored + rot) / weights,
            "salient": {str(k): sorted(v) for k, v in sorted(salient.items())}}


def dense_model_bits(model_dir: str | Path) -> dict:
    """Average bits of an unquantized model's projections (its stored dtype)."""
    from transformers import AutoConfig

    dtype = _hf_dtype(AutoConfig.from_pretrained(model_dir))
    return {"bits": float(torch.finfo(dtype).bits), "bits_with_rot": float(torch.finfo(dtype).bits), "salient": {}}


def summarize_nll(nll: torch.Tensor) -> dict:
    """Perplexity, per-bin mean NLL and the per-position mean NLL curve of ``token_nll`` output."""
    per_position = nll.mean(0)
    bins = {}
    for lo, hi in POSITION_BINS:
        bins[f"{lo}-{hi or 'end'}"] = per_position[lo - 1:(hi - 1) if hi else None].mean().item()
    return {"ppl": math.exp(nll.mean().item()), "nll_bins": bins,
            "nll_by_position": [round(v, 4) for v in per_position.tolist()]}


def load_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def save_results(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _evaluate(model: torch.nn.Module, texts: dict[str, torch.Tensor], context: int, device: str,
              batch_size: int, mc: MultipleChoice | None = None) -> dict:
    """``{"eval": {text: perplexity summary}}``, plus ``"mc": {task: accuracy}`` where ``mc`` is given."""
    model.to(device)
    context = min(context, model.config.max_position_embeddings)
    out = {"eval": {name: summarize_nll(token_nll(model, ids, context, batch_size)) for name, ids in texts.items()}}
    if mc is not None:
        out["mc"] = {task: accuracy(model, mc.tokenizer, questions, batch_size * 4)
                     for task, questions in mc.tasks.items()}
    return out


@dataclass(frozen=True)
class MultipleChoice:
    """Zero-shot multiple-choice tasks to score every row on (``offline_quantizer.multiple_choice``)."""

    tokenizer: object
    tasks: dict[str, list]


#: Settings a cached row must share with the run to be reused (``block_size`` only where a row rotates online).
_ROW_SETTINGS = ("num_samples", "seq_len", "context", "tokens", "block_size")


def _done(results: dict, key: str, texts: Iterable[str], meta: dict) -> bool:
    """Whether ``results`` holds row ``key`` for every text, measured with this run's settings ``meta``.

    The key names the quantization (bits, K, rounding, ...); the settings (calibration, context, evaluation tokens,
    the online rotation block) are checked here, so a row of other settings is measured again, never reused.
    """
    row = results.get(key)
    if row is None or not all(t in row.get("eval", {}) for t in texts):
        return False
    if any(row.get("mc", {}).get(task, {}).get("n") != n for task, n in meta.get("mc_questions", {}).items()):
        return False
    rotates_online = row.get("rotation", "none") != "none"
    stale = [m for m in _ROW_SETTINGS if (m != "block_size" or rotates_online) and row.get(m) != meta[m]]
    if stale:
        logger.info("row %s was measured with other %s: measuring it again", key, ", ".join(stale))
    return not stale


def run_grid(
    model_dir: str | Path, points: list[GridPoint], texts: dict[str, torch.Tensor], results_path: Path,
    calibration_text: str, num_samples: int, seq_len: int, context: int, block_size: int = 128,
    device: str = "cpu", batch_size: int = 4, include_fp: bool = True,
    extra_models: dict[str, tuple[Path, dict]] | None = None, mc_tasks: dict[str, list] | None = None,
    calibration: str = "c4",
) -> dict:
    """Evaluate the fp model, every grid point and ``extra_models`` (name -> (HF dir, bits info)) on ``texts``
    (and on the multiple-choice questions ``mc_tasks``: task -> ``multiple_choice.Question`` list).
    ``calibration`` names ``calibration_text``: recorded in every row, and appended to the keys of the grid rows
    unless it is "c4" (the default C4 sample from its start), so rows of another calibration draw are kept apart.

    Finished rows (same key, every text present) in ``results_path`` are skipped; each new row is saved
    as soon as it is measured.
    """
    from transformers import AutoModelForCausalLM

    results = load_results(results_path)
    meta = {"num_samples": num_samples, "seq_len": seq_len, "context": context, "block_size": block_size,
            "tokens": {name: int(ids.numel()) for name, ids in texts.items()}, "calibration": calibration}
    mc = None
    if mc_tasks:
        from transformers import AutoTokenizer

        mc = MultipleChoice(AutoTokenizer.from_pretrained(model_dir), mc_tasks)
        meta["mc_questions"] = {task: len(questions) for task, questions in mc_tasks.items()}
    if include_fp and not _done(results, FP_ROW, texts, meta):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        results[FP_ROW] = {"method": FP_ROW, **dense_model_bits(model_dir),
                           **_evaluate(model, texts, context, device, batch_size, mc), **meta}
        save_results(results_path, results)
        del model
    for name, (path, bits) in (extra_models or {}).items():
        if _done(results, name, texts, meta):
            continue
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        results[name] = {"method": name, **bits, **_evaluate(model, texts, context, device, batch_size, mc), **meta}
        save_results(results_path, results)
        del model

    def key(point: GridPoint) -> str:
        return point.key if calibration == "c4" else f"{point.key}|{calibration}"

    def record(point: GridPoint, hf_config: dict, cfg: RosaqQuantConfig, tensors: dict[str, torch.Tensor]) -> None:
        model = model_from_tensors(hf_config, cfg, tensors, dense=True)
        row = results[key(point)] = {"method": "rosaq-grid", **point.__dict__, **checkpoint_bits(tensors, cfg.bits),
                                     **_evaluate(model, texts, context, device, batch_size, mc), **meta}
        save_results(results_path, results)
        logger.info("%s: %s %s", key(point), {t: round(r["ppl"], 3) for t, r in row["eval"].items()},
                    {t: round(r["acc"], 4) for t, r in row.get("mc", {}).items()})

    by_rotation: dict[str, list[GridPoint]] = {}
    for point in points:
        if _done(results, key(point), texts, meta):
            continue
        if point.own_calibration:
            logger.info("row %s (its own calibration pass)", key(point))
            record(point, *quantize_full(model_dir, calibration_text, point, num_samples, seq_len,
                                               block_size=block_size, device=device))
        else:
            by_rotation.setdefault(point.rotation, []).append(point)
    for rotation, todo in by_rotation.items():
        logger.info("calibrating %s for %d rows", rotation, len(todo))
        rotated = rotate_for_grid(model_dir, calibration_text, rotation, num_samples, seq_len,
                                  block_size=block_size, full_moments=any(p.gptq for p in todo), device=device)
        for point in todo:
            logger.info("row %s", key(point))
            record(point, rotated.hf_config, *quantize_rotated(rotated, point, device))
        del rotated
    return results
