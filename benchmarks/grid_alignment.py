"""How much the original input basis favours group quantization of GGUF-dequantized weights.

    python benchmarks/grid_alignment.py MODEL_DIR [MODEL_DIR ...] [--json OUT]

The real weights that install offline were dequantized from llama.cpp GGUF files, so every row of every projection
lies on a 4-bit grid in blocks of 32 consecutive input channels (Q4_1 / Q4_K; some tensors Q6_K). A group quantizer
whose groups cover whole blocks of the original basis inherits part of that grid; any rotation of the input basis
(ROSAQ's) destroys it. This script measures the effect without a model run, per projection kind:

- ``distinct32``: the fraction of (row, 32-channel block) pairs with at most 16 distinct values (a 4-bit grid);
- ``rtn_err``: the relative Frobenius error of asymmetric min/max RTN (``quantize.quantize_groups``) at W4 and W3
  with groups of 128 along the input, in the stored channel order and after a random permutation of the input channels
  (the same per-row values, groups no longer aligned with the GGUF blocks). Min/max RTN depends only on the set of
  values in each group, so the difference between the two is what the grouping of channels gains: the grid if the
  groups inherit it, or any other structure of the channel order (o_proj's inputs are grouped by attention head).
"""

import argparse
import json
from collections import defaultdict

import torch
from safetensors import safe_open

from benchmarks.fold_effect import fake_quantize

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def distinct_fraction(weight: torch.Tensor, block: int = 32, levels: int = 16) -> float:
    """Fraction of ``(row, block)`` pairs of ``weight [N, K]`` holding at most ``levels`` distinct values."""
    blocks = weight.reshape(-1, block).sort(dim=1).values
    distinct = 1 + (blocks[:, 1:] != blocks[:, :-1]).sum(dim=1)
    return (distinct <= levels).double().mean().item()


def relative_rtn_error(weight: torch.Tensor, bits: int, group_size: int) -> float:
    """``‖W − RTN(W)‖_F / ‖W‖_F`` for float64 ``weight [N, K]``."""
    return (torch.linalg.norm(weight - fake_quantize(weight, bits, group_size)) / torch.linalg.norm(weight)).item()


def measure(model_dir: str, group_size: int, seed: int) -> dict[str, dict[str, float]]:
    """Per projection kind, the mean over layers of ``distinct32`` and the RTN errors (aligned / permuted)."""
    gen = torch.Generator().manual_seed(seed)
    sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    counts: dict[str, int] = defaultdict(int)
    with safe_open(f"{model_dir}/model.safetensors", "pt") as f:
        for name in f.keys():
            kind = name.split(".")[-2]
            if kind not in PROJECTIONS or not name.endswith(".weight"):
                continue
            weight = f.get_tensor(name).double()
            permuted = weight[:, torch.randperm(weight.shape[1], generator=gen)]
            row = sums[kind]
            row["distinct32"] += distinct_fraction(weight)
            for bits in (4, 3):
                row[f"w{bits}_aligned"] += relative_rtn_error(weight, bits, group_size)
                row[f"w{bits}_permuted"] += relative_rtn_error(permuted, bits, group_size)
            counts[kind] += 1
    return {kind: {key: value / counts[kind] for key, value in sums[kind].items()} for kind in PROJECTIONS
            if kind in sums}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the table to this JSON file")
    args = ap.parse_args()
    results = {}
    for model_dir in args.models:
        table = measure(model_dir, args.group_size, args.seed)
        results[model_dir] = table
        print(f"\n{model_dir} (g{args.group_size}; RTN error aligned / permuted)")
        print(f"{'projection':<10} {'≤16 values per 32':>18} {'W4':>17} {'W3':>17}")
        for kind, row in table.items():
            print(f"{kind:<10} {row['distinct32']:>18.3f} {row['w4_aligned']:>8.4f}/{row['w4_permuted']:.4f}"
                  f" {row['w3_aligned']:>8.4f}/{row['w3_permuted']:.4f}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"group_size": args.group_size, "seed": args.seed, "models": results}, out, indent=1)


if __name__ == "__main__":
    main()
