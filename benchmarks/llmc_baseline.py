"""AWQ / GPTQ baselines by llm-compressor (0.14.0.1), run in its own environment (``.venv-llmc``).

Quantizes a Hugging Face model with llm-compressor's ``oneshot`` (W{bits} asymmetric, group size g, on the same
calibration token windows as the ROSAQ sweep), then writes
  * ``OUT/compressed``: llm-compressor's own compressed-tensors checkpoint (used to count the bits),
  * ``OUT/dequantized``: an ordinary float16 Hugging Face model whose projection weights are the fake-quantized
    ones (what the compressed checkpoint computes), evaluated by the project's perplexity code,
  * ``OUT/bits.json``: average stored bits per weight of the quantized projections, counted from the
    compressed checkpoint's tensors.

Run from outside the repository root (the repo's ``kernels/`` folder would shadow the ``kernels`` package
that transformers imports): ``cd /tmp && .venv-llmc/bin/python /path/benchmarks/llmc_baseline.py ...``.
"""

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def calibration_dataset(tokenizer, text: str, num_samples: int, seq_len: int):
    """The same windows as ``offline_quantizer.calibration.token_batches`` (no special tokens)."""
    from datasets import Dataset

    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    windows = ids[: num_samples * seq_len].view(num_samples, seq_len)
    return Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})


def recipe(method: str, bits: int, group_size: int):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme, QuantizationStrategy

    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy=QuantizationStrategy.GROUP,
                               group_size=group_size)
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    if method == "awq":
        from llmcompressor.modifiers.awq import AWQModifier

        return [AWQModifier(ignore=["lm_head"], config_groups={"group_0": scheme})]
    from llmcompressor.modifiers.quantization import GPTQModifier

    return [GPTQModifier(ignore=["lm_head"], config_groups={"group_0": scheme})]


@torch.no_grad()
def export_dequantized(model, out: Path) -> None:
    """Replace each quantized weight by its fake-quantized value and save a plain float16 model."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    state = {}
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is not None and scheme.weights is not None and hasattr(module, "weight_scale"):
            zero = getattr(module, "weight_zero_point", None)
            weight = fake_quantize(module.weight, module.weight_scale, zero, scheme.weights)
            state[f"{name}.weight"] = weight.detach().to(torch.float16).cpu()
    for name, tensor in model.state_dict().items():
        if name.endswith(("weight_scale", "weight_zero_point", "weight_g_idx")) or "observer" in name:
            continue
        state.setdefault(name, tensor.detach().to(torch.float16).cpu())
    out.mkdir(parents=True, exist_ok=True)
    if model.config.tie_word_embeddings and "lm_head.weight" in state:
        state["lm_head.weight"] = state["lm_head.weight"].clone()
    save_file({k: v.contiguous() for k, v in state.items()}, out / "model.safetensors", metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = "float16"
    (out / "config.json").write_text(json.dumps(config, indent=2))


def compressed_bits(path: Path) -> dict:
    """Average stored bits per weight of the quantized projections of a compressed-tensors checkpoint."""
    stored, weights = 0, 0
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                module, _, suffix = key.rpartition(".")
                if module.rsplit(".", 1)[-1] not in PROJECTIONS or suffix == "bias":
                    continue
                tensor = f.get_tensor(key)
                if suffix == "weight_shape":
                    n, k = tensor.tolist()
                    weights += n * k
                    continue
                # scales are counted at 16 bits: the model is calibrated in float32 here, a float16 model
                # stores float16 scales
                size = 2 if suffix == "weight_scale" and tensor.element_size() > 2 else tensor.element_size()
                stored += tensor.numel() * size
    return {"bits": 8 * stored / weights, "bits_with_rot": 8 * stored / weights, "salient": {}}


def main() -> None:
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--method", choices=("awq", "gptq"), required=True)
    parser.add_argument("--bits", type=int, required=True)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--calib-file", required=True, help="calibration text (UTF-8)")
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        # llm-compressor 0.14's AWQ pins its activation cache, which raises without an accelerator
        # ("Cannot access accelerator device when none is available"); on CPU pinning is meaningless.
        torch.Tensor.pin_memory = lambda self, *_args, **_kwargs: self
    out = Path(args.out)
    if (out / "bits.json").is_file():
        return
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(args.device)
    data = calibration_dataset(tokenizer, Path(args.calib_file).read_text(encoding="utf-8"), args.num_samples,
                               args.seq_len)
    oneshot(model=model, dataset=data, recipe=recipe(args.method, args.bits, args.group_size),
            max_seq_length=args.seq_len, num_calibration_samples=args.num_samples)
    export_dequantized(model, out / "dequantized")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        if (Path(args.model) / name).is_file():
            shutil.copy(Path(args.model) / name, out / "dequantized" / name)
    model.save_pretrained(out / "compressed", save_compressed=True)
    bits = compressed_bits(out / "compressed")
    (out / "bits.json").write_text(json.dumps(bits, indent=2))
    print(f"{args.method} W{args.bits} g{args.group_size}: {bits['bits']:.3f} bits/weight -> {out}")


if __name__ == "__main__":
    main()
