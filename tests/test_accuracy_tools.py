"""The accuracy-sweep tools compute what ``rosaq-quantize`` writes, and GPTQ rounding is sound."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from rosaq_kernels.packing import unpack_zeros
from rosaq_kernels.reference import dequantize
from transformers import AutoTokenizer

from benchmarks.eval_accuracy import skip_windows
from offline_quantizer.accuracy import (
    GridPoint,
    checkpoint_bits,
    quantize_full,
    quantize_rotated,
    rotate_for_grid,
    run_grid,
)
from offline_quantizer.evaluate import load_reference_model, model_from_tensors, perplexity
from offline_quantizer.gptq import gptq_quantize_linear
from offline_quantizer.pipeline import QuantizeOptions, quantize_checkpoint
from offline_quantizer.quantize import quantize_linear
from rosaq_vllm.checkpoint import load_config, load_tensors
from tests.tiny_models import calibration_corpus

CALIB = {"num_samples": 8, "seq_len": 64}


@pytest.mark.parametrize("rotation,gptq", [("absorbed", False), ("per-layer", False), ("none", True),
                                           ("absorbed", True)])
def test_grid_tensors_equal_the_quantizer_checkpoint(tiny_model_dir, tmp_path: Path, rotation, gptq) -> None:
    model = tiny_model_dir("qwen2")
    opts = QuantizeOptions(bits=3, group_size=32, salient=16, rotation=rotation, block_size=64, gptq=gptq)
    ckpt = quantize_checkpoint(model, tmp_path / "ckpt", calibration_corpus(), opts, batch_size=8, **CALIB)
    rotated = rotate_for_grid(model, calibration_corpus(), rotation, block_size=64, full_moments=gptq, **CALIB)
    cfg, tensors = quantize_rotated(rotated, GridPoint(rotation, 3, 32, 16, gptq))
    written = load_tensors(ckpt)
    assert set(tensors) == set(written)
    for name, tensor in written.items():
        assert torch.equal(tensors[name].to(tensor.dtype), tensor), name
    # the dense effective-weight model computes the checkpoint's function
    ids = torch.randint(0, 100, (2, 24))
    with torch.no_grad():
        ref = load_reference_model(ckpt)(input_ids=ids).logits
        dense = model_from_tensors(*load_config(ckpt)[:1], cfg, written, dense=True)(input_ids=ids).logits
    torch.testing.assert_close(dense, ref, rtol=1e-4, atol=1e-4)


def test_checkpoint_bits_counts_the_tensors() -> None:
    torch.manual_seed(0)
    weight = torch.randn(64, 256)
    parts = quantize_linear(weight, torch.arange(16, dtype=torch.int32), 4, 64)
    tensors = {f"model.layers.0.mlp.down_proj.{k}": v for k, v in parts.items()}
    tensors["model.layers.0.mlp.down_proj.bias"] = torch.randn(64)  # not weight bits (AWQ's count leaves it out)
    bits = checkpoint_bits(tensors, 4)
    expected = 4 + 16 * 16 / 256 + (16 + 4) / 64 + 32 * 16 / (64 * 256)  # zero points at 4 bits
    assert bits["bits"] == pytest.approx(expected)
    assert bits["salient"] == {"256": [16]}


def _effective(parts: dict, bits: int, group_size: int) -> torch.Tensor:
    zeros = unpack_zeros(parts["qzeros"], bits)
    w = dequantize(parts["qweight"], parts["scales"], zeros, bits, group_size).double()
    w[:, parts["salient_idx"].long()] += parts["salient_weight"].double()
    return w


def test_gptq_lowers_output_error_and_equals_rtn_for_diagonal_moments() -> None:
    torch.manual_seed(0)
    n, k, g = 64, 256, 32
    x = torch.randn(2048, k, dtype=torch.float64) @ (0.3 * torch.randn(k, k, dtype=torch.float64))
    w = torch.randn(n, k, dtype=torch.float64)
    h = x.t() @ x / x.shape[0]
    salient = torch.topk(torch.diagonal(h), 16).indices.sort().values.to(torch.int32)
    errors = {}
    candidates = {"rtn": quantize_linear(w, salient, 3, g), "gptq": gptq_quantize_linear(w, h, salient, 3, g)}
    for name, parts in candidates.items():
        errors[name] = (x @ (_effective(parts, 3, g) - w).t()).pow(2).mean().item()
    assert errors["gptq"] < 0.7 * errors["rtn"]
    diagonal = gptq_quantize_linear(w, torch.diag(torch.diagonal(h)), salient, 4, g)
    rtn = quantize_linear(w, salient, 4, g)
    for key, tensor in rtn.items():
        assert torch.equal(diagonal[key], tensor), key


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_with_clip_search_uses_the_clipped_grid(act_order: bool) -> None:
    """With diagonal moments GPTQ compensates nothing, so with ``clip`` its tensors are clip-searched RTN's (which
    differ from min/max RTN's); with full moments its output error stays below clip-searched RTN's."""
    torch.manual_seed(2)
    n, k, g = 64, 192, 32
    w = torch.distributions.StudentT(3.0).sample((n, k)).to(torch.float64)
    x = torch.randn(2048, k, dtype=torch.float64) @ (0.3 * torch.randn(k, k, dtype=torch.float64))
    h = x.t() @ x / x.shape[0]
    salient = torch.topk(torch.diagonal(h), 8).indices.sort().values.to(torch.int32)
    rtn_clip = quantize_linear(w, salient, 3, g, clip=True)
    assert not torch.equal(rtn_clip["scales"], quantize_linear(w, salient, 3, g)["scales"])
    diagonal = gptq_quantize_linear(w, torch.diag(torch.diagonal(h)), salient, 3, g, act_order=act_order, clip=True)
    for key, tensor in rtn_clip.items():
        assert torch.equal(diagonal[key], tensor), key
    full = gptq_quantize_linear(w, h, salient, 3, g, act_order=act_order, clip=True)
    errors = {name: (x @ (_effective(parts, 3, g) - w).t()).pow(2).mean().item()
              for name, parts in (("rtn", rtn_clip), ("gptq", full))}
    assert errors["gptq"] < 0.7 * errors["rtn"]


def test_gptq_act_order_rounds_by_second_moment_with_fixed_group_parameters() -> None:
    """Act order: group parameters are those of RTN on the original weights; the output error stays below RTN's;
    with diagonal moments nothing is compensated, so the codes are RTN's too."""
    torch.manual_seed(1)
    n, k, g = 64, 192, 32
    x = torch.randn(4096, k, dtype=torch.float64) * torch.linspace(0.1, 3.0, k, dtype=torch.float64)[torch.randperm(k)]
    x = x @ (torch.eye(k, dtype=torch.float64) + 0.2 * torch.randn(k, k, dtype=torch.float64))
    w = torch.randn(n, k, dtype=torch.float64)
    h = x.t() @ x / x.shape[0]
    salient = torch.topk(torch.diagonal(h), 8).indices.sort().values.to(torch.int32)
    rtn = quantize_linear(w, salient, 3, g)
    ordered = gptq_quantize_linear(w, h, salient, 3, g, act_order=True)
    natural = gptq_quantize_linear(w, h, salient, 3, g)
    assert torch.equal(ordered["scales"], rtn["scales"]) and torch.equal(ordered["qzeros"], rtn["qzeros"])
    assert not torch.equal(ordered["qweight"], natural["qweight"])
    errors = {name: (x @ (_effective(parts, 3, g) - w).t()).pow(2).mean().item()
              for name, parts in {"rtn": rtn, "ordered": ordered, "natural": natural}.items()}
    assert errors["ordered"] < 0.7 * errors["rtn"], errors
    diagonal = gptq_quantize_linear(w, torch.diag(torch.diagonal(h)), salient, 3, g, act_order=True)
    for key, tensor in rtn.items():
        assert torch.equal(diagonal[key], tensor), key


def test_sequential_grid_row_equals_the_quantizer_checkpoint(tiny_model_dir, tmp_path: Path) -> None:
    """A sequential row is what ``rosaq-quantize --sequential`` writes, and differs from the non-sequential one
    (the later layers are calibrated on quantized inputs)."""
    model = tiny_model_dir("qwen2")
    point = GridPoint("absorbed", 3, 32, 16, gptq=True, act_order=True, sequential=True)
    opts = point.options(block_size=64)
    ckpt = quantize_checkpoint(model, tmp_path / "ckpt", calibration_corpus(), opts, batch_size=8, **CALIB)
    _, _, tensors = quantize_full(model, calibration_corpus(), point, block_size=64, **CALIB)
    written = load_tensors(ckpt)
    assert set(tensors) == set(written)
    for name, tensor in written.items():
        assert torch.equal(tensors[name].to(tensor.dtype), tensor), name
    plain = quantize_checkpoint(model, tmp_path / "plain", calibration_corpus(),
                                dataclasses.replace(opts, sequential=False), batch_size=8, **CALIB)
    plain_tensors = load_tensors(plain)
    last = max(int(name.split(".")[2]) for name in written if name.startswith("model.layers."))
    first_q = "model.layers.0.self_attn.q_proj.qweight"
    last_q = f"model.layers.{last}.self_attn.q_proj.qweight"
    assert torch.equal(plain_tensors[first_q], written[first_q])  # layer 0 sees the same (unquantized) inputs
    assert not torch.equal(plain_tensors[last_q], written[last_q])


_EMBED, _DOWN_ROT, _Q_CODES = ("model.embed_tokens.weight", "model.layers.0.mlp.down_proj.rot",
                               "model.layers.0.self_attn.q_proj.qweight")
_DOWN_CODES = "model.layers.0.mlp.down_proj.qweight"


@pytest.mark.parametrize(("field", "value", "suffix", "same", "differ", "absent"), [
    # the sink weight reaches each layer's moments and only those: the residual basis (the embedding) is the
    # unweighted row's, down_proj's online basis and GPTQ's codes are not
    ("sink_weight", 64.0, "|gptq|ao|sinkL64", [_EMBED], [_DOWN_ROT, _Q_CODES], []),
    # a lower outlier ratio keeps more residual axes: the residual basis differs
    ("outlier_ratio", 1.5, "|gptq|ao|or1.5", [], [_EMBED], []),
    # down_proj in its original basis: no rotation tensor, other codes there; the residual basis and q_proj unchanged
    ("online_rotation", False, "|gptq|ao|no-online", [_EMBED, _Q_CODES], [_DOWN_CODES], [_DOWN_ROT]),
])
def test_option_row_is_its_own_calibration(tiny_model_dir, tmp_path: Path, field: str, value: float, suffix: str,
                                           same: list[str], differ: list[str], absent: list[str]) -> None:
    """A row with a non-default ``field`` calibrates on its own, equals ``rosaq-quantize`` with that option, is named
    by its key, and changes (and keeps) what the option is meant to change (and keep) against the default row."""
    model = tiny_model_dir("llama")
    default_point = GridPoint("absorbed", 4, 32, 16, gptq=True, act_order=True)
    point = dataclasses.replace(default_point, **{field: value})
    assert point.own_calibration and point.key.endswith(suffix)
    assert not GridPoint("absorbed", 4, 32, 16).own_calibration
    assert GridPoint("absorbed", 4, 32, 16).key == "absorbed|w4g32|k16|rtn"
    opts = point.options(block_size=64)
    assert getattr(opts, field) == value
    ckpt = quantize_checkpoint(model, tmp_path / "ckpt", calibration_corpus(), opts, batch_size=8, **CALIB)
    _, _, tensors = quantize_full(model, calibration_corpus(), point, block_size=64, **CALIB)
    written = load_tensors(ckpt)
    for name, tensor in written.items():
        assert torch.equal(tensors[name].to(tensor.dtype), tensor), name
    _, _, default = quantize_full(model, calibration_corpus(), default_point, block_size=64, **CALIB)
    for name in same:
        assert torch.equal(default[name], tensors[name]), name
    for name in differ:
        assert not torch.equal(default[name], tensors[name]), name
    for name in absent:
        assert name in default and name not in tensors, name


def test_run_grid_caches_rows(tiny_model_dir, tmp_path: Path) -> None:
    model = tiny_model_dir("llama")
    tokenizer = AutoTokenizer.from_pretrained(model)
    ids = tokenizer(" ".join(calibration_corpus().split()[:400]), return_tensors="pt").input_ids[0][:256]
    points = [GridPoint("none", 4, 32, 0), GridPoint("absorbed", 4, 32, 16)]
    path = tmp_path / "results.json"
    kwargs = {"calibration_text": calibration_corpus(), "context": 64, "block_size": 64, **CALIB}
    results = run_grid(model, points, {"t": ids}, path, **kwargs)
    assert set(results) == {"fp16", *(p.key for p in points)}
    fp = results["fp16"]["eval"]["t"]["ppl"]
    assert fp == pytest.approx(perplexity(load_reference_model_fp(model), ids, 64), rel=1e-6)
    saved = json.loads(path.read_text())
    assert saved[points[1].key]["salient"] == {"64": [16], "128": [16]} or saved[points[1].key]["salient"]
    # cached rows are not recomputed
    again = run_grid(model, points, {"t": ids}, path, **{**kwargs, "calibration_text": "unused"})
    assert again == saved
    # a row measured with another online rotation block is measured again; rows without one are reused
    other = run_grid(model, points, {"t": ids}, path, **{**kwargs, "block_size": 32})
    assert other["fp16"] == saved["fp16"] and other[points[0].key] == saved[points[0].key]
    assert other[points[1].key]["block_size"] == 32 and saved[points[1].key]["block_size"] == 64
    # another calibration draw: rows of their own (the key names it), the fp row and the first draw's rows kept
    shifted = run_grid(model, points, {"t": ids}, path, **{**kwargs, "calibration_text": calibration_corpus()[500:],
                                                           "calibration": "c4+1x64"})
    assert set(shifted) == {*other, *(f"{p.key}|c4+1x64" for p in points)}
    same = [json.dumps(shifted[k], sort_keys=True) == json.dumps(other[k], sort_keys=True) for k in other]  # NaN bins
    assert all(same)
    new_rows = [shifted[f"{p.key}|c4+1x64"] for p in points]
    assert all(row["calibration"] == "c4+1x64" for row in new_rows)
    # round-to-nearest in the original space ignores the calibration; the rotated row's basis and salient set do not
    assert new_rows[0]["eval"]["t"]["ppl"] == other[points[0].key]["eval"]["t"]["ppl"]
    assert new_rows[1]["eval"]["t"]["ppl"] != other[points[1].key]["eval"]["t"]["ppl"]


def test_skip_windows_starts_the_calibration_at_a_later_token(tiny_model_dir) -> None:
    model = tiny_model_dir("llama")
    tokenizer = AutoTokenizer.from_pretrained(model)
    text = calibration_corpus()
    ids = tokenizer(text, add_special_tokens=False).input_ids
    rest = skip_windows(model, text, 100)
    assert text.endswith(rest) and len(rest) < len(text)
    assert tokenizer(rest, add_special_tokens=False).input_ids[:50] == ids[100:150]
    with pytest.raises(ValueError, match="calib-offset"):
        skip_windows(model, text, len(ids))


def test_grid_rows_carry_multiple_choice_accuracy(tiny_model_dir, tmp_path: Path) -> None:
    from offline_quantizer.multiple_choice import Question, accuracy

    model = tiny_model_dir("llama")
    tokenizer = AutoTokenizer.from_pretrained(model)
    ids = tokenizer(" ".join(calibration_corpus().split()[:400]), return_tensors="pt").input_ids[0][:128]
    questions = [Question("The cat sat on the", (" mat.", " roof of a house", " dog"), 0),
                 Question("Question: what is it?\nAnswer:", (" a dog", " the end"), 1)]  # fmt: skip
    path = tmp_path / "results.json"
    kwargs = {"calibration_text": calibration_corpus(), "context": 64, "block_size": 64, **CALIB}
    point = GridPoint("absorbed", 4, 32, 16)
    results = run_grid(model, [point], {"t": ids}, path, mc_tasks={"q": questions}, **kwargs)
    assert results["fp16"]["mc"]["q"] == accuracy(load_reference_model_fp(model), tokenizer, questions)
    assert results[point.key]["mc"]["q"]["n"] == 2 and results[point.key]["mc_questions"] == {"q": 2}
    # a cached row without these questions is measured again
    again = run_grid(model, [point], {"t": ids}, path, mc_tasks={"q": questions[:1]}, **kwargs)
    assert again["fp16"]["mc"]["q"]["n"] == 1 and again[point.key]["mc"]["q"]["n"] == 1


def load_reference_model_fp(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_absorbed_rotation_is_exact_in_float32(tiny_model_dir, arch: str) -> None:
    """Calibrating in float32 (what rosaq-quantize does) must give the rotated weights of every site: v_proj is
    rotated by the attn_out site after the attn_in site has read it."""
    model_dir = tiny_model_dir(arch)
    rotated = rotate_for_grid(model_dir, calibration_corpus(), "absorbed", block_size=64, **CALIB)
    cfg, tensors = quantize_rotated(rotated, GridPoint("absorbed", 4, 32, 0))
    model = model_from_tensors(rotated.hf_config, cfg, tensors, dense=True)
    with torch.no_grad():
        for prefix, linear in rotated.linears.items():
            weight = linear.weight
            if linear.rot is not None:
                weight = weight @ torch.block_diag(*linear.rot).t()
            model.get_submodule(prefix).weight.copy_(weight.float())
        ids = torch.randint(0, 100, (2, 24))
        expected = load_reference_model_fp(model_dir)(input_ids=ids).logits
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_accuracy_report_only_keeps_matching_rows(tmp_path: Path, monkeypatch, capsys) -> None:
    from benchmarks import accuracy_report

    def row(ppl: float, bits: float) -> dict:
        bins = {"1-2": 9.0, "128-end": 3.0}
        return {"bits": bits, "bits_with_rot": bits, "salient": {"576": [0]},
                "eval": {"wt2": {"ppl": ppl, "nll_bins": bins}}}

    results = {
        "fp16": {"bits": 16.0, "bits_with_rot": 16.0,
                 "eval": {"wt2": {"ppl": 20.5, "nll_bins": {"1-2": 8.0, "128-end": 2.9}}}},
        "none|w3g64|k0|gptq|ao|seq": row(44.17, 3.297),
        "absorbed|w3g64|k0|gptq|ao|seq|mix-novo|seed1": row(39.29, 3.297),
        "absorbed|w3g64|k0|gptq|ao|seq|mix": row(50.24, 3.297),
    }
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    only = r"none\|.*|absorbed\|.*\|mix-novo(\|seed\d+)?"
    monkeypatch.setattr("sys.argv", ["accuracy_report.py", str(path), "--only", only])
    accuracy_report.main()
    table = capsys.readouterr().out
    assert "44.17" in table and "39.29" in table and "20.50" in table
    assert "50.24" not in table  # the `mix` row does not match
