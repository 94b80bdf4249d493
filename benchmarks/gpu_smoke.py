"""GPU smoke test of the plugin inside vLLM (run on the device): a tiny ROSAQ checkpoint served with CUDA graphs.

Usage: ``python benchmarks/gpu_smoke.py BITS`` (one vLLM engine per process). Quantizes a tiny random Llama,
generates 16 greedy tokens with vLLM (fp16, compiled + CUDA graphs,
so the fused Triton kernel runs through ``torch.ops.rosaq.linear``) and compares them with the torch reference
model of the same checkpoint (float32, CPU). Prints the matching prefix length per checkpoint.
"""

import sys
import tempfile
from pathlib import Path

import torch


def reference_greedy(checkpoint: Path, prompt_ids: list[int], new_tokens: int) -> list[int]:
    from offline_quantizer.evaluate import load_reference_model

    model = load_reference_model(checkpoint)
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        for _ in range(new_tokens):
            ids = torch.cat([ids, model(input_ids=ids).logits[0, -1].argmax().view(1, 1)], dim=1)
    return ids[0, len(prompt_ids):].tolist()


def main() -> None:
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from offline_quantizer.pipeline import QuantizeOptions, quantize_checkpoint
    from tests.tiny_models import calibration_corpus, make_tiny_model

    root = Path(tempfile.mkdtemp())
    model = make_tiny_model("llama", root / "model")
    for bits in [int(b) for b in sys.argv[1:]] or [4]:
        ckpt = quantize_checkpoint(model, root / f"w{bits}", calibration_corpus(),
                                   QuantizeOptions(bits=bits, group_size=32, salient=16, block_size=64),
                                   num_samples=8, seq_len=64, batch_size=4)
        prompt = AutoTokenizer.from_pretrained(ckpt)("The little cat walks to the garden").input_ids
        llm = LLM(model=str(ckpt), dtype="float16", max_model_len=256, gpu_memory_utilization=0.2)
        out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=16, temperature=0,
                                                                           ignore_eos=True))
        served = list(out[0].outputs[0].token_ids)
        ref = reference_greedy(ckpt, prompt, 16)
        match = next((i for i, (a, b) in enumerate(zip(served, ref, strict=True)) if a != b), len(ref))
        print(f"RESULT W{bits}: served {served}\nRESULT W{bits}: ref    {ref}\nRESULT W{bits}: matching prefix "
              f"{match}/16 (vLLM fp16 + CUDA graphs vs float32 reference)", flush=True)



if __name__ == "__main__":
    main()
