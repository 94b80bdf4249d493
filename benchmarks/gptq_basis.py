"""Layer-wise quantization error of one projection in different input bases, with and without GPTQ.

    python benchmarks/gptq_basis.py --model smollm2 [--layers 3 15 27] [--bits 3] [--salient 0 0.03]

For every projection of the chosen decoder layers (inputs of the full-precision model, calibration on the shipped C4
sample) it quantizes the weight in four input bases — the original one, the PCA basis of that input's own second
moment ``H``, that PCA basis with its non-salient directions mixed by a random orthogonal matrix
(``--complement random``), and a random orthogonal basis — by round-to-nearest and by GPTQ with activation order
(``offline_quantizer.gptq``), the salient channels chosen by energy in each basis, and prints the relative output
error ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` (the expected squared error of ``x·Wᵀ`` over the calibration tokens), averaged
over the layers. GPTQ's gain over round-to-nearest comes from the off-diagonal part of ``H``: in the PCA basis
``H`` is diagonal and the two coincide. The perplexity effects are in docs/accuracy.md; this shows the mechanism.
"""

import argparse
from collections import defaultdict

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks.eval_accuracy import MODELS, model_dir
from offline_quantizer import assets
from offline_quantizer.adapters import DecoderAdapter
from offline_quantizer.calibration import capture_first_layer_inputs, run_layer, token_batches
from offline_quantizer.evaluate import effective_weight
from offline_quantizer.gptq import gptq_quantize_linear
from offline_quantizer.pipeline import SITES, _record_moments
from offline_quantizer.quantize import quantize_linear
from offline_quantizer.rotation import mix_complement, pca_basis, random_orthogonal
from offline_quantizer.saliency import select_salient
from rosaq_vllm.checkpoint import RosaqQuantConfig

BASES = ("original", "pca", "pca+mix", "random")


def site_bases(moment: torch.Tensor, num_salient: int) -> dict[str, torch.Tensor]:
    """The float64 ``[K, K]`` orthogonal input bases compared, for a site's second moment ``moment [K, K]``."""
    k = moment.shape[0]
    pca = pca_basis(moment)
    principal = torch.zeros(k, dtype=torch.bool)
    principal[:num_salient] = True  # PCA columns are in decreasing energy: the salient ones come first
    return {"original": torch.eye(k, dtype=torch.float64), "pca": pca,
            "pca+mix": mix_complement(pca[None], principal[None])[0], "random": random_orthogonal(k)}


def relative_errors(weight: torch.Tensor, moment: torch.Tensor, basis: torch.Tensor, num_salient: int, bits: int,
                    group_size: int) -> tuple[float, float]:
    """``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` of ``weight [N, K]`` quantized in input basis ``basis`` (all float64), by
    round-to-nearest and by GPTQ with activation order (the same salient channels and rotated operands for both)."""
    w = weight @ basis
    h = basis.t() @ moment @ basis
    salient_idx = select_salient(torch.diagonal(h), num_salient)
    reference = torch.trace(w @ h @ w.t())
    errors = []
    for parts in (quantize_linear(w, salient_idx, bits, group_size),
                  gptq_quantize_linear(w, h, salient_idx, bits, group_size, act_order=True)):
        delta = effective_weight(parts, bits, group_size).to(torch.float64) - w
        errors.append((torch.trace(delta @ h @ delta.t()) / reference).item())
    return errors[0], errors[1]


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help=f"{', '.join(MODELS)} or a HF model directory")
    ap.add_argument("--layers", type=int, nargs="+", default=[3, 15])
    ap.add_argument("--bits", type=int, default=3, choices=(3, 4))
    ap.add_argument("--group-size", type=int, default=0, help="0: the model's default (SmolLM2 64, else 128)")
    ap.add_argument("--salient", type=float, nargs="+", default=[0.0, 0.03])
    ap.add_argument("--num-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    args = ap.parse_args()
    path = model_dir(args.model)
    group_size = args.group_size or MODELS.get(args.model, (None, 128))[1]
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    adapter = DecoderAdapter(model)
    inputs = capture_first_layer_inputs(adapter, token_batches(tokenizer, assets.calibration_text(),
                                                               args.num_samples, args.seq_len, 4))
    errors: dict[tuple, list[float]] = defaultdict(list)
    for index, layer in enumerate(adapter.layers):
        if index > max(args.layers):
            break
        if index in args.layers:
            blocks = {site: adapter.projection(layer, proj).in_features for site, (proj, _) in SITES.items()}
            moments, _ = _record_moments(adapter, layer, inputs, blocks)
            for site, (_, projections) in SITES.items():
                moment = moments[site].mean()[0]
                for fraction in args.salient:
                    num_salient = RosaqQuantConfig(bits=args.bits, group_size=group_size,
                                                   salient_fraction=fraction).num_salient_for(moment.shape[0])
                    for basis_name, basis in site_bases(moment, num_salient).items():
                        for name in projections:
                            weight = adapter.projection(layer, name).weight.to(torch.float64)
                            pair = relative_errors(weight, moment, basis, num_salient, args.bits, group_size)
                            for gptq, err in zip((False, True), pair, strict=True):
                                errors[(name, fraction, basis_name, gptq)].append(err)
            print(f"layer {index} done", flush=True)
        inputs = run_layer(layer, inputs)
    print(f"\n{args.model} W{args.bits} g{group_size}, layers {args.layers}: relative output error "
          "tr(ΔW H ΔWᵀ)/tr(W H Wᵀ), round-to-nearest / GPTQ (act-order)")
    names = sorted({key[0] for key in errors}, key=lambda n: [p for _, ps in SITES.values() for p in ps].index(n))
    for fraction in args.salient:
        print(f"\nK = {fraction:g}")
        print(f"{'projection':<10}" + "".join(f"{b:>22}" for b in BASES))
        for name in names:
            cells = []
            for basis_name in BASES:
                rtn, gptq = (sum(errors[(name, fraction, basis_name, g)]) / len(args.layers) for g in (False, True))
                cells.append(f"{rtn:>11.5f}/{gptq:.5f}")
            print(f"{name:<10}" + "".join(f"{c:>22}" for c in cells))


if __name__ == "__main__":
    main()
