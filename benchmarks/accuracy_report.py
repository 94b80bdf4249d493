"""Tables (markdown) and the perplexity-vs-bits plot of the accuracy results JSON files.

Usage: python benchmarks/accuracy_report.py bench_runs/accuracy-smollm2.json [MORE.json ...]
[--plot docs/accuracy-smollm2.png] [--only REGEX] [--title TITLE]
Several files: their rows together, a later file's row winning on the same key. ``--only``: the rows whose key
matches REGEX (and fp16). The plot needs matplotlib; rows that differ only in their mixing seed share one series.
"""

import argparse
import json
import re
from pathlib import Path

LABELS = {"none": "original space", "absorbed": "ROSAQ absorbed", "per-layer": "ROSAQ per-layer"}


def rows(results: dict) -> list[tuple]:
    out = []
    for key, row in results.items():
        texts = row["eval"]
        if key == "fp16" or key.startswith("llmc-"):
            method, config = (key, "") if key == "fp16" else key.split("|")
            k, rounding = "-", "-"
        else:
            rotation, config, k, rounding, *flags = key.split("|")  # flags: "ao" (act order), "seq" (sequential)
            rounding = "+".join([rounding, *flags])
            method = LABELS[rotation]
            k = ",".join(f"{s}/{width}" for width, counts in row["salient"].items() for s in counts)
        out.append(
            (
                method,
                config,
                k,
                rounding,
                row["bits"],
                row["bits_with_rot"],
                *(texts[t]["ppl"] if t in texts else float("nan") for t in ("wiki", "wt2")),
                texts.get("wt2", texts.get("wiki"))["nll_bins"]["1-2"],
                texts.get("wt2", texts.get("wiki"))["nll_bins"]["128-end"],
            )
        )
    return sorted(out, key=lambda r: (r[1], r[0], r[4]))


def _ppl(value: float) -> str:
    return "–" if value != value else f"{value:.2f}"  # nan: text not measured for this row


def table(results: dict) -> str:
    header = (
        "| method | W/g | S per linear (S/K) | rounding | bits/w | +rot | ppl wiki | ppl wt2 | NLL pos 1 "
        "| NLL pos ≥128 |"
    )
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows(results):
        lines.append(
            f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.3f} | {r[5]:.2f} | {_ppl(r[6])} | {_ppl(r[7])} | "
            f"{r[8]:.2f} | {r[9]:.2f} |"
        )
    return "\n".join(lines)


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    text = "wt2" if "wt2" in results["fp16"]["eval"] else "wiki"
    series: dict[str, list] = {}
    for key, row in results.items():
        if key == "fp16":
            continue
        parts = key.split("|")  # rotation, W/g, K, rounding, flags ("ao", "seq", "mix", "mix-novo")
        flags = [p for p in parts[3:] if not re.fullmatch(r"seed\d+", p)]
        name = parts[0] if key.startswith("llmc-") else f"{LABELS[parts[0]]} {'+'.join(flags)}"
        bits = row.get("bits_format2", row["bits"])  # rows measured before format 2: their format-2 bits
        series.setdefault(name, []).append((bits, row["eval"][text]["ppl"]))
    for name, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", label=name, alpha=0.8)
    ax.axhline(results["fp16"]["eval"][text]["ppl"], color="k", ls="--", label="fp16")
    ax.set_yscale("log")
    ax.set_xlabel("average bits per weight (quantized projections; rotations excluded)")
    ax.set_ylabel(f"perplexity ({text})")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("results", nargs="+")
    parser.add_argument("--plot")
    parser.add_argument("--title", default="")
    parser.add_argument("--only", help="regular expression: keep the rows whose key matches it (and fp16)")
    args = parser.parse_args()
    results = {key: row for path in args.results for key, row in json.loads(Path(path).read_text()).items()}
    if args.only:
        results = {key: row for key, row in results.items() if key == "fp16" or re.fullmatch(args.only, key)}
    print(table(results))
    if args.plot:
        plot(results, Path(args.plot), args.title)


if __name__ == "__main__":
    main()
