"""benchmarks/bench_e2e.py on a tiny shape: the random model builder and the ROSAQ quantize step (no vLLM)."""

import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from rosaq_vllm.checkpoint import validate_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_e2e  # noqa: E402


def test_build_and_quantize_tiny(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    bench_e2e.main(["build", "--out", str(out), "--shape", "llama3-8b", "--num-layers", "2", "--hidden", "256"])
    config = json.loads((out / "model" / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_key_value_heads"]) == (2, 256, 8)
    index = json.loads((out / "model" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 4  # embedding, one shard per layer, norm + lm_head
    with safe_open(out / "model" / index["weight_map"]["model.layers.1.mlp.down_proj.weight"], "pt") as f:
        weight = f.get_tensor("model.layers.1.mlp.down_proj.weight")
    assert weight.dtype == torch.float16 and weight.shape == (256, 512)
    assert (weight != 0).all() and 0.015 < weight.float().std() < 0.025

    for bits in (4, 3):
        result = bench_e2e.quantize(out, bits, "cpu", num_samples=4, seq_len=64, salient=16)
        assert result["peak_device_bytes"] is None and result["quantize_s"] > 0
        cfg = validate_checkpoint(out / f"rosaq-w{bits}", check_values=True)
        assert cfg.bits == bits and cfg.group_size == 128
    assert bench_e2e.quantize(out, 4, "cpu", num_samples=4, seq_len=64, salient=16, online_rotation=False)
    assert validate_checkpoint(out / "rosaq-w4", check_values=True).online_rotation == ("down_proj",)
    assert validate_checkpoint(out / "rosaq-w4-norot", check_values=True).online_rotation == ()
    kwargs, env = bench_e2e._engine_args(out, "rosaq-w4-norot", 1, 512, 0.5, False)
    assert kwargs["model"] == str(out / "rosaq-w4-norot") and env == {}
    assert sorted(p.name for p in (out / "results").glob("quantize-*.json")) == [
        "quantize-w3.json", "quantize-w4-norot.json", "quantize-w4.json"]


def test_profile_decode_per_step_and_categories(tmp_path: Path) -> None:
    import profile_decode

    # Kernel names as vLLM 0.26 / Triton / CUTLASS print them (shortened).
    names = {
        "_rosaq_linear_kernel": "ROSAQ linear (Triton)",
        "_block_rotate_kernel": "ROSAQ rotation (Triton)",
        "_salient_addmm_kernel": "ROSAQ salient pass (Triton)",
        "void cutlass::device_kernel<machete::MacheteKernelTemplate<cutlass::half_t>>(Params)": "Machete",
        "void MARLIN_NAMESPACE_NAME::Marlin<(vllm::ScalarTypeId)4, 256, 1, 8>(int4 const*)": "Marlin",
        "void flash::flash_fwd_splitkv_kernel<Flash_fwd_kernel_traits<128>>(Flash_fwd_params)":
            "attention (with the KV-cache writes)",
        "nvjet_hsh_128x64_64x5_1x2_h_bz_coopA_NTN": "dense GEMM (cuBLAS / CUTLASS)",
        "triton_red_fused_fused_add_rms_norm_marlin_gemm_2": "norms, activation, rotary (torch.compile)",
        "Memset (Device)": "memset",
        "_compute_slot_mappings_kernel": profile_decode.OTHER,
    }
    assert {name: profile_decode.categorize(name) for name in names} == names

    prefill = {"a": [4, 40.0], "b": [1, 100.0], "same": [2, 7.0]}
    full = {"a": [4 + 3 * 8, 40.0 + 3 * 8 * 2.5], "b": [1, 100.0], "c": [8, 16.0], "same": [2, 7.0]}
    steps = profile_decode.per_step(prefill, full, 8)
    assert steps == {"a": {"count": 3.0, "us": 7.5}, "c": {"count": 1.0, "us": 2.0}}

    results = tmp_path / "results"
    results.mkdir()
    meta = {"date": "d", "gpu": "g", "torch": "t", "triton": "tr", "vllm": "v"}
    for config, us in (("rosaq-w4", 7.5), ("awq-marlin", 5.0)):
        row = {"batch": 1, "steps": 8, "wall_ms_per_step": 1.25, "gpu_us_per_step": us,
               "kernels": {"_rosaq_linear_kernel" if config == "rosaq-w4" else "Marlin<4>": {"count": 3.0, "us": us}}}
        (results / f"profile-{config}.json").write_text(json.dumps({"config": config, "rows": [row], **meta}))
    profile_decode.main(["report", "--out", str(tmp_path)])
    text = (tmp_path / "profile.md").read_text()  # columns in file order: awq-marlin, rosaq-w4
    assert "| | awq-marlin | rosaq-w4 |" in text
    assert "| ROSAQ linear (Triton) | – | 8 (3 launches) |" in text
    assert "| Marlin | 5 (3 launches) | – |" in text
    assert "| wall per step, µs (median) | 1250 | 1250 |" in text
    assert "| wall minus kernels, µs | 1245 | 1242 |" in text


def test_worker_reports_the_median_of_repeated_generates(tmp_path: Path, monkeypatch) -> None:
    """The offline worker times ``--repeats`` generates per batch and reports their median (an engine stand-in whose
    generates take known, different times; no vLLM engine)."""
    import types

    import rosaq_vllm

    durations = iter([0.5, 2.0, 1.0, 4.0, 0.25, 3.0])  # three timed generates per batch size (warm-ups take none)
    clock = {"t": 0.0}

    class FakeLLM:
        def __init__(self, **kwargs) -> None:
            self.kwargs = kwargs

        def generate(self, prompts, params, use_tqdm=False):
            if params.max_tokens > 8:  # a timed generate: advance the clock by its duration
                clock["t"] += next(durations)
            tokens = list(range(params.max_tokens))
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=tokens)]) for _ in prompts]

    class FakeParams:
        def __init__(self, max_tokens: int, **kwargs) -> None:
            self.max_tokens = max_tokens

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"vocab_size": 1000}))
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=FakeLLM, SamplingParams=FakeParams,
                                                                   __version__="fake"))
    monkeypatch.setattr(rosaq_vllm, "register", lambda: None)
    monkeypatch.setattr(bench_e2e.time, "perf_counter", lambda: clock["t"])
    result = tmp_path / "offline.json"
    bench_e2e.main(["_worker", "--config", "rosaq-w4-norot", "--engine", json.dumps({"model": str(model)}),
                    "--env", "{}", "--result", str(result), "--gen-len", "10", "--repeats", "3",
                    "--batches", "1", "4"])
    rows = json.loads(result.read_text())["rows"]
    assert [(r["batch"], r["gen_tokens"], r["seconds"], r["tok_per_s"]) for r in rows] == [
        (1, 10, 1.0, 10.0), (4, 40, 3.0, 13.3)]
    assert [r["tok_per_s_samples"] for r in rows] == [[20.0, 5.0, 10.0], [10.0, 160.0, 13.3]]
