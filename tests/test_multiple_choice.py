"""Zero-shot multiple-choice scoring (``offline_quantizer.multiple_choice``) against direct computations."""

import gzip
import json
import math
from pathlib import Path

import pytest
import torch

from offline_quantizer.multiple_choice import Question, continuation_loglikelihoods, read_requests, score


def _request(doc_id: int, idx: int, context: str, continuation: str, label: int) -> dict:
    return {"request_type": "loglikelihood", "doc_id": doc_id, "idx": idx, "label": label,
            "request": {"context": context, "continuation": continuation}}  # fmt: skip


def _write(path: Path, requests: list[dict]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as out:
        out.writelines(json.dumps(r) + "\n" for r in requests)
    return path


def test_read_requests_groups_choices_and_skips_unconditional_requests(tmp_path: Path) -> None:
    requests = [
        _request(1, 1, "Q2:", " no", 0), _request(0, 2, "Q1:", " c", 2), _request(1, 0, "Q2:", " yes", 0),
        _request(0, 0, "Q1:", " a", 2), _request(1_000_000, 0, "Answer:", " a", 2), _request(0, 1, "Q1:", " b", 2),
    ]  # fmt: skip
    path = _write(tmp_path / "r.jsonl.gz", requests)
    assert read_requests(path) == [Question("Q1:", (" a", " b", " c"), 2), Question("Q2:", (" yes", " no"), 0)]
    assert read_requests(path, limit=1) == [Question("Q1:", (" a", " b", " c"), 2)]


def test_read_requests_rejects_a_question_with_two_contexts(tmp_path: Path) -> None:
    path = _write(tmp_path / "r.jsonl.gz", [_request(0, 0, "Q1:", " a", 0), _request(0, 1, "Q1 again:", " b", 0)])
    with pytest.raises(ValueError, match="document 0"):
        read_requests(path)


def test_score_takes_the_largest_sum_and_the_largest_sum_per_character() -> None:
    questions = [Question("q", (" a", " bbbbbb"), 1), Question("q", (" x", " y", " z"), 0)]
    # Question 1: the long choice has the lower sum (-3 vs -2) but the higher per-character score (-0.43 vs -1).
    result = score(questions, [-2.0, -3.0, -1.0, -0.5, -4.0])
    assert result["acc"] == 0.0 and result["acc_per_char"] == 0.5
    assert result["n"] == 2 and result["stderr"] == 0.0
    result = score(questions, [-4.0, -3.0, -0.1, -0.5, -4.0])
    assert result["acc"] == 1.0 and math.isclose(result["stderr"], 0.0)
    with pytest.raises(ValueError):
        score(questions, [-1.0])


def test_continuation_loglikelihoods_equal_one_sequence_at_a_time_in_float64(tiny_model_dir) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = tiny_model_dir("llama")
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float64).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    pairs = [
        ("The cat sat on the", " mat."),
        ("A", " much longer answer than the others, of many tokens"),
        ("Question: what is it?\nAnswer:", " a dog"),
        ("The cat sat on the", " roof of the red house"),
    ]
    got = continuation_loglikelihoods(model, tokenizer, pairs, batch_size=3)  # padded batches, sorted by length
    for (context, continuation), value in zip(pairs, got, strict=True):
        n_context = len(tokenizer(context).input_ids)
        ids = torch.tensor([tokenizer(context + continuation).input_ids])
        with torch.no_grad():
            logprobs = model(input_ids=ids).logits.log_softmax(-1)[0]
        want = sum(logprobs[p - 1, ids[0, p]].item() for p in range(n_context, ids.shape[1]))
        assert ids.shape[1] > n_context and value < 0
        assert math.isclose(value, want, rel_tol=1e-9, abs_tol=1e-9), (context, continuation, value, want)
