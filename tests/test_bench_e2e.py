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
    assert sorted(p.name for p in (out / "results").glob("quantize-*.json")) == ["quantize-w3.json", "quantize-w4.json"]
