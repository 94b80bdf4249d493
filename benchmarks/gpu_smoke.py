"""GPU smoke test of the plugin inside vLLM (run on the device): a tiny ROSAQ checkpoint served with CUDA graphs.

Usage: ``python benchmarks/gpu_smoke.py BITS [--machete]`` (one vLLM engine per process; ``--machete``: group
size 64 and a 64+-token prompt sent 64 times, so prefill and decode take the Machete path on Hopper).
Quantizes a tiny random Llama, generates 16 greedy tokens with vLLM (fp16, compiled + CUDA graphs,
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

    machete = "--machete" in sys.argv  # g64, a 64+-token prompt sent 64 times: Machete for prefill and decode
    root = Path(tempfile.mkdtemp())
    model = make_tiny_model("llama", root / "model")
    for bits in [int(b) for b in sys.argv[1:] if b.isdigit()] or [4]:
        ckpt = quantize_checkpoint(model, root / f"w{bits}", calibration_corpus(),
                                   QuantizeOptions(bits=bits, group_size=64 if machete else 32, salient=16,
                                                   block_size=64),
                                   num_samples=8, seq_len=64, batch_size=4)
        text = "The little cat walks to the garden" + (" and sees a bird in the old tree" * 8 if machete else "")
        prompt = AutoTokenizer.from_pretrained(ckpt)(text).input_ids
        copies = 64 if machete else 1
        if machete:
            from rosaq_kernels.machete import MACHETE_MIN_M, machete_supported

            print(f"prompt {len(prompt)} tokens x {copies}; Machete path expected: "
                  f"{machete_supported(torch.device('cuda'), bits, 64, 128, 128, torch.float16)} "
                  f"(from {MACHETE_MIN_M} rows)", flush=True)
        llm = LLM(model=str(ckpt), dtype="float16", max_model_len=256, gpu_memory_utilization=0.2)
        out = llm.generate([{"prompt_token_ids": prompt}] * copies,
                           SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
        ref = reference_greedy(ckpt, prompt, 16)
        for i, o in enumerate(out):
            served = list(o.outputs[0].token_ids)
            match = next((j for j, (a, b) in enumerate(zip(served, ref, strict=True)) if a != b), len(ref))
            if i == 0 or match < len(ref):
                print(f"RESULT W{bits} request {i}: served {served}\nRESULT W{bits}: ref    {ref}\n"
                      f"RESULT W{bits} request {i}: matching prefix {match}/16 (vLLM fp16 + CUDA graphs vs "
                      "float32 reference)", flush=True)
        print(f"RESULT W{bits}: {copies} request(s) done", flush=True)



if __name__ == "__main__":
    main()
