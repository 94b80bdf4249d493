"""Perplexity of round-to-nearest with and without the RMSNorm scales folded into the linears.

    python benchmarks/fold_effect.py MODEL_DIR [--bits 3] [--group-size 64] [--max-tokens 8192]

Fake-quantizes every projection of a Llama-family model with ``quantize.quantize_groups`` (asymmetric min/max RTN,
groups along the input), once on the weights as they are and once on ``W·diag(γ)`` (the folded weights that the
shared residual basis needs; the result divided by γ again, so both models compute with unfolded norms), and prints
the WikiText-2 perplexity of each (``evaluate.perplexity``, context 2048). The evidence for folding only where the
rotation needs it (docs/accuracy.md).
"""

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from offline_quantizer.evaluate import perplexity
from offline_quantizer.quantize import quantize_groups

WIKITEXT = "../shared/data/wikitext-2-raw/wiki.test.raw"


def fake_quantize(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """float64 ``[N, K]``: the dequantized RTN codes of ``weight``."""
    codes, scales, zeros = quantize_groups(weight, bits, group_size)
    n, k = weight.shape
    grouped = codes.view(n, k // group_size, group_size).double() - zeros.double().unsqueeze(-1)
    return (grouped * scales.double().unsqueeze(-1)).view(n, k)


@torch.no_grad()
def quantized_model(model_dir: str, fold: bool, bits: int, group_size: int) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        normed = ((layer.input_layernorm, (attn.q_proj, attn.k_proj, attn.v_proj)),
                  (layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj)))
        for norm, linears in normed:
            gamma = norm.weight.double() if fold else torch.ones_like(norm.weight, dtype=torch.float64)
            for linear in linears:
                w = linear.weight.double() * gamma
                linear.weight.copy_((fake_quantize(w, bits, group_size) / gamma).float())
        for linear in (attn.o_proj, mlp.down_proj):
            linear.weight.copy_(fake_quantize(linear.weight.double(), bits, group_size).float())
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--text", default=WIKITEXT)
    args = ap.parse_args()
    text = open(args.text, encoding="utf-8").read().replace("\r\n", "\n")
    ids = AutoTokenizer.from_pretrained(args.model)(text, return_tensors="pt").input_ids[0][: args.max_tokens]
    for fold in (False, True):
        model = quantized_model(args.model, fold, args.bits, args.group_size)
        name = "folded" if fold else "unfolded"
        print(f"RTN W{args.bits} g{args.group_size} {name}: perplexity {perplexity(model, ids, 2048):.2f}", flush=True)


if __name__ == "__main__":
    main()
