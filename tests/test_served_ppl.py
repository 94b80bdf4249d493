"""Served perplexity (vLLM OpenAI server, prompt logprobs) equals the offline evaluation of the same checkpoint."""

import math

import pytest
import torch
from transformers import AutoTokenizer

from benchmarks.served_ppl import compare, offline_nll, served_nll, token_windows
from tests.tiny_models import calibration_corpus
from tests.vllm_server import openai_server

CONTEXT, WINDOWS = 128, 4


def test_token_windows_match_the_offline_layout() -> None:
    ids = torch.arange(1000)
    windows = token_windows(ids, 100, 3)
    assert windows.shape == (3, 100) and windows[1, 0].item() == 100 and windows[2, -1].item() == 299
    with pytest.raises(ValueError):
        token_windows(ids, 500, 3)


def test_compare_reports_the_relative_difference() -> None:
    offline = torch.full((2, 9), 2.0, dtype=torch.float64)
    result = compare(offline + 0.01, offline)
    assert result["rel_diff"] == pytest.approx(math.exp(0.01) - 1, rel=1e-9)
    assert result["max_token_nll_diff"] == pytest.approx(0.01)
    assert (result["windows"], result["context"]) == (2, 10)


@pytest.mark.slow
def test_served_perplexity_matches_offline(tiny_checkpoint) -> None:
    checkpoint = tiny_checkpoint("llama")
    ids = AutoTokenizer.from_pretrained(checkpoint)(calibration_corpus(seed=7), return_tensors="pt").input_ids[0]
    windows = token_windows(ids, CONTEXT, WINDOWS)
    with openai_server(checkpoint, "--enforce-eager") as base_url:
        served = served_nll(base_url, windows)
    offline = offline_nll(checkpoint, windows)
    result = compare(served, offline)
    assert served.shape == offline.shape == (WINDOWS, CONTEXT - 1)
    assert result["rel_diff"] < 0.01, result
    # per token, not only on average: both compute the same float32 function
    assert result["max_token_nll_diff"] < 0.02, result
