"""End to end on this CPU: ROSAQ checkpoints served by vLLM's OpenAI server through the rosaq plugin.

The served greedy tokens must equal those of the Hugging Face model built from the same checkpoint
with the torch reference linear (``offline_quantizer.evaluate.load_reference_model``).
"""

import pytest
import torch
from openai import OpenAI
from transformers import AutoTokenizer

from offline_quantizer.evaluate import load_reference_model
from tests.vllm_server import openai_server

pytestmark = pytest.mark.slow
NEW_TOKENS = 16


def reference_greedy(checkpoint, prompt_ids: list[int], new_tokens: int = NEW_TOKENS) -> list[int]:
    model = load_reference_model(checkpoint)
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        for _ in range(new_tokens):
            next_id = model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    return ids[0, len(prompt_ids):].tolist()


CASES = [
    pytest.param("llama", ["--enforce-eager"], {}, id="llama-eager"),
    pytest.param("llama", [], {}, id="llama-compiled"),
    pytest.param("qwen2", [], {}, id="qwen2-compiled"),
    pytest.param("qwen2", ["--enforce-eager"], {}, id="qwen2-eager"),
    pytest.param("llama", ["--enforce-eager", "--tensor-parallel-size", "2"],
                 {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}, id="llama-tp2"),
]


@pytest.mark.parametrize("arch,args,env", CASES)
def test_served_greedy_tokens_match_reference(tiny_checkpoint, arch: str, args: list[str], env: dict) -> None:
    checkpoint = tiny_checkpoint(arch)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    prompt_ids = tokenizer("The little cat walks to the garden").input_ids
    messages = [{"role": "user", "content": "What does the dog like?"}]
    chat_text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    chat_ids = tokenizer(chat_text, add_special_tokens=False).input_ids
    with openai_server(checkpoint, *args, env=env) as base_url:
        client = OpenAI(base_url=base_url, api_key="unused")
        completion = client.completions.create(
            model="rosaq", prompt=prompt_ids, max_tokens=NEW_TOKENS, temperature=0,
            extra_body={"return_token_ids": True, "ignore_eos": True})
        chat = client.chat.completions.create(
            model="rosaq", messages=messages, max_tokens=NEW_TOKENS, temperature=0,
            extra_body={"return_token_ids": True, "ignore_eos": True})
    assert completion.choices[0].text
    assert completion.choices[0].token_ids == reference_greedy(checkpoint, prompt_ids)
    # A random model may well produce tokens that decode to nothing; the token ids are the real check.
    assert isinstance(chat.choices[0].message.content, str) and chat.choices[0].finish_reason == "length"
    assert chat.prompt_token_ids == chat_ids
    assert chat.choices[0].token_ids == reference_greedy(checkpoint, chat_ids)


def test_missing_tensor_is_refused_before_loading(tiny_checkpoint, tmp_path) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    checkpoint = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint("llama"), checkpoint)
    tensors = load_file(checkpoint / "model.safetensors")
    del tensors["model.layers.0.mlp.down_proj.rot"]
    save_file(tensors, checkpoint / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match="model.layers.0.mlp.down_proj.rot: missing"):
        with openai_server(checkpoint, "--enforce-eager", timeout_s=300):
            pass
