"""Load on this CPU: vLLM's OpenAI server with a ROSAQ checkpoint under 200 concurrent requests, then abuse.

Loopback only (``tests/vllm_server.py`` binds 127.0.0.1); every loop is bounded in count and time.
"""

import asyncio
import json
import time

import httpx
import pytest

from tests.vllm_server import openai_server

pytestmark = pytest.mark.slow

PROMPTS = [f"{subject} {verb}" for subject in ("The cat", "A small dog", "My friend", "The farmer", "Our teacher")
           for verb in ("sees", "likes", "opens", "reads")]  # 20 distinct prompts
REQUESTS = 200
CONCURRENCY = 32
MAX_TOKENS = 8


def _body(prompt: str, **changes) -> dict:
    return {"model": "rosaq", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, **changes}


async def _complete(client: httpx.AsyncClient, prompt: str) -> tuple[str, list[int]]:
    response = await client.post("/completions", json=_body(prompt))
    response.raise_for_status()
    choice = response.json()["choices"][0]
    return choice["text"], choice["token_ids"]


async def _sequential(base_url: str) -> dict[str, tuple[str, list[int]]]:
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        return {prompt: await _complete(client, prompt) for prompt in PROMPTS}


async def _concurrent(base_url: str) -> tuple[list[tuple[str, tuple[str, list[int]] | BaseException]], float]:
    limit = asyncio.Semaphore(CONCURRENCY)
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as client:

        async def one(prompt: str) -> tuple[str, list[int]]:
            async with limit:
                return await _complete(client, prompt)

        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(REQUESTS)]
        start = time.monotonic()
        results = await asyncio.wait_for(asyncio.gather(*(one(p) for p in prompts), return_exceptions=True), 150)
        return list(zip(prompts, results, strict=True)), time.monotonic() - start


MALFORMED = [
    pytest.param(b"{not json", id="bad-json"),
    pytest.param(b"", id="empty-body"),
    pytest.param(json.dumps(["a", "list"]).encode(), id="body-not-object"),
    pytest.param(_body("Hi", max_tokens="eight"), id="max_tokens-string"),
    pytest.param(_body("Hi", temperature="hot"), id="temperature-string"),
    pytest.param(_body("Hi", max_tokens=-1), id="max_tokens-negative"),
    pytest.param(_body("Hi", max_tokens=10**9), id="max_tokens-beyond-context"),
    pytest.param(_body("Hi", model="gpt-4"), id="unknown-model"),
    pytest.param(_body("word " * 400), id="prompt-too-long"),
    pytest.param(_body([10**9]), id="token-id-out-of-vocab"),
    pytest.param({"model": "rosaq"}, id="no-prompt"),
]


async def _malformed(base_url: str) -> list[tuple[str, int, str]]:
    answers = []
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        for case in MALFORMED:
            body = case.values[0]
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            response = await client.post("/completions", content=content,
                                         headers={"Content-Type": "application/json"})
            answers.append((case.id, response.status_code, response.text[:200]))
    return answers


def test_concurrent_greedy_answers_match_sequential_and_bad_requests_get_4xx(tiny_checkpoint) -> None:
    checkpoint = tiny_checkpoint("llama")
    with openai_server(checkpoint, "--enforce-eager", "--max-num-seqs", "16", timeout_s=300) as base_url:
        expected = asyncio.run(_sequential(base_url))
        results, seconds = asyncio.run(_concurrent(base_url))
        bad = asyncio.run(_malformed(base_url))
        after = asyncio.run(_sequential(base_url))
        health = httpx.get(base_url.removesuffix("/v1") + "/health", timeout=10).status_code

    errors = [(p, r) for p, r in results if isinstance(r, BaseException)]
    assert not errors, f"{len(errors)} of {REQUESTS} requests failed, e.g. {errors[0]!r}"
    mismatches = [(p, r, expected[p]) for p, r in results if r != expected[p]]
    assert not mismatches, f"{len(mismatches)} concurrent answers differ from the sequential ones: {mismatches[:3]}"
    assert all(len(ids) == MAX_TOKENS for _, ids in expected.values())
    assert len({text for text, _ in expected.values()}) > 1  # the prompts really lead to different answers
    print(f"{REQUESTS} requests, concurrency {CONCURRENCY}: {seconds:.1f} s, {REQUESTS / seconds:.1f} req/s")

    print("malformed:", ", ".join(f"{case} {status}" for case, status, _ in bad))
    not_4xx = [(case, status, text) for case, status, text in bad if not 400 <= status < 500]
    assert not not_4xx, f"malformed requests not answered with 4xx: {not_4xx}"
    assert dict((c, s) for c, s, _ in bad)["unknown-model"] == 404
    assert after == expected, "the server answers differently after the malformed requests"
    assert health == 200
