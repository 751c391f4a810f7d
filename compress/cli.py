"""`chansearch`: the command line. Each subcommand is a thin layer over the library."""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from compress.errors import CompressError

EPILOG = "TARGET is a zoo name (`chansearch models`) or a compress checkpoint (.pt)."


class _Help(argparse.HelpFormatter):
    """Shows each flag's default, unless there is none to show or the help already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.default not in (None, False, argparse.SUPPRESS) and "default" not in text
                and action.option_strings):
            text += " (default: %(default)s)"
        return text


def _formatter(prog):
    return _Help(prog, max_help_position=32)


def _model_args(p: argparse.ArgumentParser, pretrained: bool = True, resumable: bool = False) -> None:
    p.add_argument("target", metavar="TARGET", nargs="?" if resumable else None,
                   help="zoo name or checkpoint path" + (" (not with --resume)" if resumable else ""))
    p.add_argument("--input-size", type=int, default=None,
                   help="input height/width (default: the model's, 224 or 32 for *_cifar)")
    p.add_argument("--num-classes", type=int, default=None, help="classes (zoo models; default: the model's)")
    p.add_argument("--width-mult", type=float, default=1.0, help="width multiplier (zoo models)")
    if pretrained:
        p.add_argument("--pretrained", default=None, metavar="torchvision|PATH",
                       help="torchvision weights, or a local .pth state_dict (default: random init)")


def _load(args) -> "torch.nn.Module":  # noqa: F821
    from compress.models import load_target
    return load_target(args.target, num_classes=args.num_classes, width_mult=args.width_mult,
                       pretrained=getattr(args, "pretrained", None), input_size=args.input_size)


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=1))


# ---- models -------------------------------------------------------------------------------
def cmd_models(args) -> int:
    from compress.models import ZOO, build
    from compress.profile import count, human
    rows = []
    for name, entry in ZOO.items():
        macs, params = count(build(name), entry.input_size)
        rows.append({"name": name, "input_size": entry.input_size, "num_classes": entry.num_classes,
                     "macs": macs, "params": params, "torchvision_weights": entry.weights,
                     "description": entry.description})
    if args.json:
        _print_json(rows)
        return 0
    print(f"{'model':<26}{'input':>6}{'classes':>8}{'MACs':>10}{'params':>9}  description")
    for r in rows:
        print(f"{r['name']:<26}{r['input_size']:>6}{r['num_classes']:>8}{human(r['macs']):>10}"
              f"{human(r['params']):>9}  {r['description']}")
    return 0


# ---- profile ------------------------------------------------------------------------------
def cmd_profile(args) -> int:
    from compress.profile import human, profile_model
    model = _load(args)
    report = profile_model(model, divisor=args.divisor)
    if args.json:
        _print_json(report)
        return 0
    print(f"{args.target}: {human(report['macs'])} MACs, {human(report['params'])} params "
          f"at {report['input_size']}x{report['input_size']}, {report['num_classes']} classes")
    print(f"{'group':<36}{'width':>7}{'max':>7}{'ratio':>7}")
    for g in report["groups"]:
        print(f"{g['name']:<36}{g['width']:>7}{g['max']:>7}{g['width'] / g['max']:>7.2f}")
    return 0


# ---- prune --------------------------------------------------------------------------------
def cmd_prune(args) -> int:
    from compress.checkpoint import save_checkpoint
    from compress.profile import human
    from compress.prune import prune_target
    model = _load(args)
    pruned, info = prune_target(model, config=args.config, macs=args.macs, width=args.width,
                                importance=args.importance, strategy=args.strategy,
                                divisor=args.divisor)
    record = save_checkpoint(args.output, pruned, provenance={
        "created_by": "chansearch prune", "parent": args.target, "importance": args.importance,
        "strategy": info["strategy"], "target_macs": info.get("target_macs")})
    result = {"output": str(args.output), "macs_before": info["macs_before"], "params_before": info["params_before"],
              "macs": record["macs"], "params": record["params"], "config": record["config"]}
    if args.json:
        _print_json(result)
    else:
        print(f"before: {human(info['macs_before'])} MACs, {human(info['params_before'])} params")
        print(f"after:  {human(record['macs'])} MACs ({record['macs'] / info['macs_before']:.1%}), "
              f"{human(record['params'])} params ({record['params'] / info['params_before']:.1%})")
        print(f"saved {args.output}")
    return 0


# ---- eval ---------------------------------------------------------------------------------
def cmd_eval(args) -> int:
    import torch
    from compress.data import eval_set, loader
    from compress.evaluate import evaluate
    model = _load(args)
    cfg = model.compress_cfg
    ds = eval_set(args.data, cfg["input_size"], cfg["mean"], cfg["std"], cfg["num_classes"])
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    metrics = evaluate(model.to(device), loader(ds, args.batch_size, workers=args.workers), device,
                       progress=not args.json and sys.stderr.isatty(), max_batches=args.max_batches)
    if args.json:
        _print_json(metrics)
    else:
        print(f"{args.target} on {args.data}: top-1 {metrics['top1']:.2%}, top-5 {metrics['top5']:.2%}, "
              f"loss {metrics['loss']:.4f} ({metrics['images']} images)")
    return 0


# ---- train / finetune -----------------------------------------------------------------------
TRAIN_HELP = {
    "epochs": "training epochs", "batch_size": "global batch size (split across torchrun processes)",
    "lr": "peak learning rate", "optimizer": "sgd (Nesterov momentum) or adamw",
    "momentum": "SGD momentum", "weight_decay": "weight decay (not on BN, biases, depthwise weights)",
    "schedule": "cosine or linear decay per step, after warm-up", "warmup_epochs": "linear warm-up epochs",
    "label_smoothing": "label smoothing of the cross-entropy", "clip_grad": "max gradient norm (0 = off)",
    "amp": "mixed precision on CUDA: none, bf16 or fp16", "channels_last": "channels_last memory format",
    "ema_decay": "EMA of the weights (0 = off, e.g. 0.9998)",
    "kd_temperature": "KD softmax temperature", "kd_weight": "share of the KD loss (with --teacher)",
    "holdout": "training images held out (for search), picked with --seed",
    "val_images": "evaluation images per epoch (0 = the whole evaluation split)",
    "steps_per_epoch": "cap on steps per epoch (0 = whole training set; for smoke tests)",
    "workers": "data loader processes per rank", "seed": "random seed",
    "deterministic": "deterministic algorithms (bit-exact resume on CPU)", "quiet": "no progress output",
}


def _train_args(p: argparse.ArgumentParser) -> None:
    from dataclasses import fields
    from compress.train import TrainConfig
    p.add_argument("--data", metavar="SPEC", help="cifar10:DIR, imagefolder:DIR, npz:FILE or synthetic:N (required)")
    p.add_argument("--teacher", default=None, metavar="TARGET", help="distill from this zoo model or checkpoint")
    g = p.add_argument_group("training")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            g.add_argument(flag, action="store_true", help=TRAIN_HELP[f.name])
        else:
            g.add_argument(flag, type=type(f.default), default=f.default, help=TRAIN_HELP[f.name])


def _train_config(args) -> "TrainConfig":  # noqa: F821
    from dataclasses import fields
    from compress.train import TrainConfig
    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})


def _resumed_args(args, parser_command: str) -> argparse.Namespace:
    """With --resume RUN_DIR, the run's own saved arguments (only --quiet may change)."""
    if not args.resume:
        if not args.target or not args.data:
            raise CompressError(f"`chansearch {parser_command}` needs a TARGET and --data SPEC "
                                "(or --resume RUN_DIR to continue a run).")
        return args
    saved = Path(args.resume) / "args.json"
    if not saved.is_file():
        raise CompressError(f"cannot resume '{args.resume}': it has no args.json (not a "
                            f"`chansearch {parser_command}` run folder).")
    old = argparse.Namespace(**json.loads(saved.read_text()))
    old.quiet, old.resume = args.quiet, args.resume
    return old


def _start_run(args, run_dir: Path) -> bool:
    """Record the arguments of a new run; True when resuming."""
    from compress import distributed
    resuming = bool(args.resume)
    if not resuming:
        from compress.train import STATE_FILE
        if (run_dir / STATE_FILE).exists():
            raise CompressError(f"run folder '{run_dir}' already holds a run; resume it with "
                                f"--resume {run_dir}, or choose another folder.")
        if distributed.is_main():
            run_dir.mkdir(parents=True, exist_ok=True)
            record = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}
            (run_dir / "args.json").write_text(json.dumps(record, indent=1))
    return resuming


def cmd_train(args) -> int:
    from compress import distributed
    from compress.checkpoint import save_checkpoint
    from compress.models import load_target
    from compress.train import fit
    args = _resumed_args(args, "train")
    run_dir = Path(args.out)
    resuming = _start_run(args, run_dir)
    import torch
    torch.manual_seed(args.seed)  # the initial weights, identical on every rank and rerun
    model = _load(args)
    teacher = load_target(args.teacher) if args.teacher else None
    trained = fit(model, args.data, _train_config(args), run_dir, teacher=teacher, resume=resuming)
    if distributed.is_main():
        save_checkpoint(run_dir / "model.pt", trained, provenance={
            "created_by": "chansearch train", "parent": args.target, "data": args.data, "epochs": args.epochs})
        print(f"saved {run_dir / 'model.pt'}")
    return 0


def cmd_finetune(args) -> int:
    from compress import distributed
    from compress.checkpoint import save_checkpoint
    from compress.models import load_target
    from compress.train import fit
    args = _resumed_args(args, "finetune")
    if not args.output:
        raise CompressError("`chansearch finetune` needs -o OUT.pt, the fine-tuned checkpoint to write.")
    output = Path(args.output)
    run_dir = Path(args.run_dir or output.with_name(output.stem + "_run"))
    args.run_dir = str(run_dir)
    resuming = _start_run(args, run_dir)
    model = _load(args)
    teacher = load_target(args.teacher) if args.teacher else None
    trained = fit(model, args.data, _train_config(args), run_dir, teacher=teacher, resume=resuming)
    if distributed.is_main():
        save_checkpoint(output, trained, provenance={
            "created_by": "chansearch finetune", "parent": args.target, "data": args.data,
            "epochs": args.epochs, "teacher": args.teacher})
        print(f"saved {output}")
    return 0


# ---- export / latency ----------------------------------------------------------------------
def cmd_export(args) -> int:
    from compress.data import sample_images
    from export import export_onnx, export_tflite
    model = _load(args)
    cfg = model.compress_cfg
    size = args.input_size or cfg["input_size"]
    calib = images = None
    if args.calib_data:
        images = sample_images(args.calib_data, False, args.parity_images, size, cfg["mean"], cfg["std"], seed=1)
        if args.int8:
            calib = sample_images(args.calib_data, True, args.calib_images, size, cfg["mean"], cfg["std"])
    elif args.int8:
        raise CompressError("--int8 needs calibration images: pass --calib-data SPEC (e.g. cifar10:DIR); "
                            "--calib-images N of its training split calibrate, its evaluation split checks parity.")
    if args.format == "onnx":
        if args.int8 or args.nhwc:
            raise CompressError("--int8 and --nhwc apply to --format tflite.")
        report = export_onnx(model, args.output, size, opset=args.opset, images=images, tolerance=args.tolerance)
    else:
        report = export_tflite(model, args.output, size, int8=args.int8, calib_images=calib, images=images,
                               nhwc=args.nhwc, tolerance=args.tolerance, min_agreement=args.min_agreement)
    if args.json:
        _print_json(report)
    else:
        p = report["parity"]
        print(f"wrote {report['path']} ({report['bytes'] / 1e6:.2f} MB); parity on {p['images']} "
              f"{'real' if images is not None else 'random'} images: max |diff| {p['max_abs_diff']:.3g}, "
              f"top-1 agreement {p['top1_agreement']:.1%}")
    return 0


def cmd_latency(args) -> int:
    from export.latency import check_budget, measure, measure_adb
    options = dict(threads=args.threads, warmup=args.warmup, runs=args.runs)
    if args.device == "local":
        result = measure(args.model, args.backend, **options)
    elif args.device.split(":")[0] == "adb":
        serial = args.device.partition(":")[2] or None
        result = measure_adb(args.model, serial, binary=args.benchmark_binary, use_xnnpack=not args.no_xnnpack,
                             taskset=args.taskset, **options)
    else:
        raise CompressError(f"unknown --device '{args.device}'; use local or adb[:SERIAL].")
    if args.budget_ms is not None:
        result.update(budget_ms=args.budget_ms, within_budget=result["median_ms"] <= args.budget_ms)
    if args.json:
        _print_json(result)
    else:
        print(f"{result['model']} on {result['backend']} ({result['runtime']}, {result['device']}, "
              f"{result['threads']} thread(s), {result['runs']} runs): median {result['median_ms']:.3f} ms, "
              + (f"p90 {result['p90_ms']:.3f} ms, " if result["p90_ms"] is not None else "")
              + f"min {result['min_ms']:.3f} ms, std {result['std_ms']:.3f} ms")
    if args.budget_ms is not None:
        check_budget(result, args.budget_ms)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chansearch", formatter_class=_formatter,
        description="Compress CNNs for edge devices: channel spaces, pruning, supernets, search, export.",
        epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("models", help="list the zoo models with MACs and params", formatter_class=_formatter)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("profile", help="MACs, params and channel groups of a model",
                       formatter_class=_formatter, epilog=EPILOG)
    _model_args(p)
    p.add_argument("--divisor", type=int, default=8, help="width divisor of the channel space")
    p.add_argument("--json", action="store_true", help="print one JSON object (macs, params, groups)")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("prune", help="prune a model to a channel config, MAC target or width",
                       formatter_class=_formatter, epilog=EPILOG)
    _model_args(p)
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--config", metavar="FILE.json", help="channel config: group name -> width")
    how.add_argument("--macs", metavar="150M", help="MAC target (150M, 1.2G, 50%% of the model)")
    how.add_argument("--width", type=float, metavar="0.75", help="uniform width multiplier")
    p.add_argument("--importance", default="l1", choices=["l1", "l2", "first", "bn"],
                   help="which channels to keep in each group")
    p.add_argument("--strategy", default="uniform", choices=["uniform", "global"],
                   help="how --macs spreads the cut: every group alike, or by importance across groups")
    p.add_argument("--divisor", type=int, default=8, help="widths are multiples of this")
    p.add_argument("-o", "--output", required=True, type=Path, help="output checkpoint (.pt)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("eval", help="top-1/top-5 accuracy and loss on a data set",
                       formatter_class=_formatter, epilog=EPILOG)
    _model_args(p)
    p.add_argument("--data", required=True, metavar="SPEC",
                   help="cifar10:DIR, imagefolder:DIR, npz:FILE or synthetic:N")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch")
    p.add_argument("--workers", type=int, default=2, help="data loader processes")
    p.add_argument("--max-batches", type=int, default=None, help="stop after this many batches")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--json", action="store_true", help="print JSON with top1, top5, loss")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="export to ONNX or TFLite (float/int8) and check parity with PyTorch",
                       formatter_class=_formatter, epilog=EPILOG)
    _model_args(p)
    p.add_argument("--format", required=True, choices=["onnx", "tflite"], help="output format")
    p.add_argument("-o", "--output", required=True, type=Path, help="output file (.onnx / .tflite)")
    p.add_argument("--int8", action="store_true", help="TFLite int8 post-training quantization (per-channel weights)")
    p.add_argument("--calib-data", metavar="SPEC", help="real images: training split calibrates int8, "
                   "evaluation split checks parity (default parity input: random)")
    p.add_argument("--calib-images", type=int, default=200, help="calibration images for --int8")
    p.add_argument("--parity-images", type=int, default=100, help="images compared with PyTorch")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max absolute logit difference (float exports)")
    p.add_argument("--min-agreement", type=float, default=None, help="fail an int8 export under this top-1 agreement")
    p.add_argument("--nhwc", action="store_true", help="TFLite input in NHWC layout")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("latency", help="measure latency of an .onnx/.tflite file, here or on a phone; budget check",
                       formatter_class=_formatter,
                       epilog="Exit status 3 when the median is over --budget-ms (for CI pipelines).")
    p.add_argument("model", metavar="MODEL_FILE", help=".onnx or .tflite file")
    p.add_argument("--backend", default="auto", help="auto (by suffix), onnxruntime or tflite")
    p.add_argument("--threads", type=int, default=1, help="inference threads")
    p.add_argument("--runs", type=int, default=100, help="timed runs")
    p.add_argument("--warmup", type=int, default=10, help="untimed warm-up runs")
    p.add_argument("--device", default="local", help="local, or adb[:SERIAL] for an Android phone")
    p.add_argument("--benchmark-binary", default="/data/local/tmp/benchmark_model",
                   help="path of TFLite's benchmark_model on the phone")
    p.add_argument("--no-xnnpack", action="store_true", help="run benchmark_model without XNNPACK")
    p.add_argument("--taskset", default=None, metavar="MASK", help="pin benchmark_model to these CPUs (e.g. f0)")
    p.add_argument("--budget-ms", type=float, default=None, help="fail (exit 3) when the median is over this")
    p.add_argument("--json", action="store_true", help="print JSON (median_ms, p90_ms, ...)")
    p.set_defaults(func=cmd_latency)

    p = sub.add_parser("train", help="train a model (from scratch or pretrained); torchrun-ready",
                       formatter_class=_formatter, epilog=EPILOG + " Resume an interrupted run with --resume RUN_DIR.")
    _model_args(p, resumable=True)
    _train_args(p)
    p.add_argument("--out", default="runs/train", help="run folder: last.pt, metrics.jsonl, model.pt")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue this run folder with its own settings")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("finetune", help="fine-tune a (pruned) checkpoint, optionally distilling from a teacher",
                       formatter_class=_formatter, epilog=EPILOG)
    p.add_argument("target", metavar="CKPT", nargs="?", help="checkpoint to fine-tune (not with --resume)")
    p.add_argument("--input-size", type=int, default=None, help="train at this input size (default: the checkpoint's)")
    _train_args(p)
    p.add_argument("-o", "--output", help="fine-tuned checkpoint (.pt; required)")
    p.add_argument("--run-dir", default=None, help="run folder (default: OUTPUT's name + _run)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue this run folder with its own settings")
    p.set_defaults(func=cmd_finetune, num_classes=None, width_mult=1.0, pretrained=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = bool(os.environ.get("COMPRESS_DEBUG"))
    try:
        with warnings.catch_warnings():
            if not debug:  # library deprecation chatter is noise to a CLI user
                warnings.filterwarnings("ignore", category=DeprecationWarning)
                warnings.filterwarnings("ignore", category=FutureWarning)
            return args.func(args) or 0
    except CompressError as exc:
        print(f"chansearch {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"chansearch {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader (`| head`) went away; nothing more to say
        return 0
    except Exception as exc:  # an internal bug: one clear paragraph, traceback only on request
        if debug:
            raise
        print(f"chansearch {args.command}: internal error: {type(exc).__name__}: {exc}. This is a bug in "
              "compress; rerun with COMPRESS_DEBUG=1 for the traceback and report it.", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
