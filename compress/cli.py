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
                       pretrained=getattr(args, "pretrained", None), input_size=args.input_size,
                       from_scratch=getattr(args, "from_scratch", False))


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
    from compress.data import eval_set, loader, random_subset
    from compress.evaluate import evaluate
    if args.images < 0:
        raise CompressError(f"--images {args.images}: give a number of images to evaluate, or 0 for all.")
    model = _load(args)
    cfg = model.compress_cfg
    ds = eval_set(args.data, cfg["input_size"], cfg["mean"], cfg["std"], cfg["num_classes"])
    ds = random_subset(ds, args.images, args.seed)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    metrics = evaluate(model.to(device), loader(ds, args.batch_size, workers=args.workers), device,
                       progress=not args.json and sys.stderr.isatty())
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
            "created_by": "chansearch train", "parent": args.target, "data": args.data, "epochs": args.epochs,
            "from_scratch": getattr(args, "from_scratch", False)})
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


# ---- supernet / search / extract -----------------------------------------------------------------
def cmd_supernet(args) -> int:
    import torch
    from compress import distributed
    from compress.supernet import build_supernet, save_supernet
    from compress.supernet.pruningnet import pruningnet_step
    from compress.supernet.slimmable import reorder_channels, sandwich_step
    from compress.train import fit
    args = _resumed_args(args, "supernet")
    cfg = _train_config(args)
    if cfg.holdout <= 0:
        raise CompressError("--holdout must be positive: the search scores configs on held-out training images.")
    run_dir = Path(args.out)
    resuming = _start_run(args, run_dir)
    torch.manual_seed(args.seed)
    model = _load(args)
    pretrained = args.pretrained is not None
    supernet = build_supernet(model, args.method, divisor=args.divisor, min_width=args.min_width,
                              hidden=args.hidden, affine_bn=pretrained)
    if args.method == "slimmable":
        if pretrained and not args.no_reorder:
            reorder_channels(supernet)
        step = sandwich_step(supernet, num_random=args.num_random, uniform=args.uniform,
                             distill=not args.no_distill, label_smoothing=cfg.label_smoothing)
    else:
        if pretrained:
            supernet.fit_pretrained()
        step = pruningnet_step(supernet, label_smoothing=cfg.label_smoothing)
    # A PruningNet keeps no BN statistics while training; it is scored after recalibration below.
    trained = fit(supernet, args.data, cfg, run_dir, step=step, resume=resuming, validate=args.method == "slimmable")
    holdout = {"data": args.data, "count": cfg.holdout, "seed": cfg.seed}
    if distributed.is_main():
        save_supernet(run_dir / "supernet.pt", trained, holdout, provenance={
            "created_by": "chansearch supernet", "parent": args.target, "epochs": cfg.epochs,
            "pretrained": args.pretrained})
        print(f"saved {run_dir / 'supernet.pt'}")
    summary = _supernet_summary(trained, holdout, args)
    if distributed.is_main():
        (run_dir / "supernet_eval.json").write_text(json.dumps(summary, indent=1))
        for name, e in summary.items():
            print(f"{name} config: {e['macs'] / 1e6:.2f}M MACs, held-out top-1 {e['top1']:.2%} "
                  f"(BN recalibrated on {args.recal_images} images)")
    return 0


def _supernet_summary(supernet, holdout: dict, args) -> dict:
    """Held-out accuracy of the max and min configs, BN recalibrated."""
    from compress.search import Evaluator
    evaluator = Evaluator(supernet, _held_out(supernet, holdout, args.recal_images, args.eval_images), _device())
    space = supernet.space
    return {name: {k: v for k, v in e.items() if k != "config"}
            for name, e in zip(("max", "min"), evaluator.score_many([space.max(), space.min()]))}


def _device():
    import torch
    from compress import distributed
    return distributed.init()[2] if torch.cuda.is_available() else torch.device("cpu")


def _held_out(supernet, holdout: dict, recal_images: int, eval_images: int, data: str | None = None):
    from compress.data import train_holdout
    from compress.search import HeldOut
    if not holdout.get("count"):
        raise CompressError("this supernet was trained without held-out images (--holdout 0); the search "
                            "scores configs on held-out training images. Retrain with --holdout N.")
    cfg = supernet.compress_cfg
    _, held, _ = train_holdout(data or holdout["data"], cfg["input_size"], cfg["mean"], cfg["std"],
                               cfg["num_classes"], holdout["count"], holdout["seed"])
    return HeldOut(held, recal_images, eval_images, seed=holdout["seed"])


def _file_digest(path: Path) -> str:
    import hashlib
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _search_setup(args, run_dir: Path, out: Path, fresh_state: bool = False):
    """The loaded supernet, its record and an Evaluator whose cache lives in `out`."""
    from compress.search import Evaluator
    from compress.supernet import load_supernet
    supernet_path = run_dir / "supernet.pt" if run_dir.is_dir() else run_dir
    if not supernet_path.is_file():
        raise CompressError(f"'{run_dir}' holds no supernet.pt; pass the run folder of `chansearch supernet`.")
    supernet, record = load_supernet(supernet_path)
    held = _held_out(supernet, record["holdout"], args.recal_images, args.eval_images, args.data)
    fingerprint = {"supernet": _file_digest(supernet_path), "data": args.data or record["holdout"]["data"],
                   "holdout": record["holdout"]["count"], "holdout_seed": record["holdout"]["seed"],
                   "recal_images": args.recal_images, "eval_images": args.eval_images}
    latency = None
    if getattr(args, "lut", None):
        from export.lut import latency_predictor
        latency = latency_predictor(args.lut, supernet.space)
        fingerprint["lut"] = _file_digest(Path(args.lut))
    evaluator = Evaluator(supernet, held, _device(), latency=latency, state_path=out / "state.json",
                          fingerprint=fingerprint)
    return supernet, record, evaluator


def cmd_search(args) -> int:
    from compress import distributed
    from compress.search import parse_budgets, run_search, write_results
    distributed.init()
    run_dir = Path(args.run_dir)
    out = Path(args.out or (run_dir if run_dir.is_dir() else run_dir.parent) / f"search-{args.method}")
    supernet, record, evaluator = _search_setup(args, run_dir, out)
    if args.latency_ms and not args.lut:
        raise CompressError("--latency-ms needs --lut FILE, a latency table of this space "
                            "(make one with `chansearch lut`).")
    budgets = parse_budgets(supernet.space, args.macs, args.params, args.latency_ms)
    options = ({"step": args.greedy_step} if args.method == "greedy" else
               {"samples": args.samples} if args.method == "random" else
               {"population": args.population, "parents": args.parents, "mutations": args.mutations,
                "crossovers": args.crossovers, "iterations": args.iterations, "mutation_prob": args.mutation_prob})
    log = None if args.quiet or not distributed.is_main() else (lambda msg: print(msg, flush=True))
    if log and evaluator.cache:
        log(f"resuming: {len(evaluator.cache)} configs already scored in {out / 'state.json'}")
    result = run_search(evaluator, args.method, budgets, seed=args.seed, options=options, progress=log)
    result["supernet"] = str(run_dir)
    result["evaluation"] = evaluator.fingerprint
    if args.latency_ms:
        result = _measure_finalists(result, supernet, args, out)
    write_results(out, result, evaluator)
    if args.json:
        _print_json(result)
    elif distributed.is_main():
        full = result["full"]
        print(f"full config: {full['macs'] / 1e6:.2f}M MACs, held-out top-1 {full['top1']:.2%}")
        for t in result["targets"]:
            lat = f", {t['latency_ms']:.3f} ms predicted" if t.get("latency_ms") is not None else ""
            meas = f", {t['measured_ms']:.3f} ms measured" if t.get("measured_ms") is not None else ""
            print(f"{t['label']:<24} {t['macs'] / 1e6:8.2f}M MACs {t['params'] / 1e6:6.2f}M params{lat}{meas}, "
                  f"held-out top-1 {t['top1']:.2%}")
        print(f"{result['evaluated']} configs scored ({result['evaluated_now']} now); wrote {out / 'search.json'}, "
              f"search.csv, search.png")
    return 0


def _measure_finalists(result: dict, supernet, args, out: Path) -> dict:
    """The latency table screened the candidates; time each chosen config for real."""
    from export.lut import LatencyTable, measure_configs
    table = LatencyTable.load(args.lut, supernet.space).record
    measured = measure_configs(supernet.plain_copy(), supernet.space, [t["config"] for t in result["targets"]],
                               table["backend"], table["threads"])
    for t, ms in zip(result["targets"], measured):
        limit = t["budget"]["latency_ms"]
        t.update(measured_ms=ms, measured_backend=table["backend"], measured_within_budget=limit is None or ms <= limit)
        if not t["measured_within_budget"]:
            print(f"warning: {t['label']}: measured {ms:.3f} ms on {table['backend']} is over the {limit} ms budget "
                  f"(predicted {t['latency_ms']:.3f} ms); tighten --latency-ms or rebuild the table on a quiet machine.",
                  file=sys.stderr)
    return result


def cmd_lut(args) -> int:
    from export.lut import build_table, check_table
    model, space = _lut_model_space(args)
    record = build_table(model, space, backend=args.backend, threads=args.threads, grid=args.grid,
                         anchors=args.anchors, runs=args.runs, warmup=args.warmup, progress=not args.quiet)
    if args.check:
        record["check"] = check_table(model, space, record, configs=args.check, runs=args.runs, warmup=args.warmup,
                                      progress=not args.quiet)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, output)
    print(f"wrote {output}: {len(record['layers'])} layers ({record['unique_layers']} distinct timings) on "
          f"{args.backend}, {args.threads} thread(s); fit: {record['fit']['a']:.3f} x layer sum + {record['fit']['b']:.3f} ms")
    if args.check:
        c = record["check"]
        print(f"check on {c['configs']} random configs: {c['within_10pct']:.0%} within +-10% of the measured latency "
              f"(mean |error| {c['mean_abs_error_pct']:.1f}%, max {c['max_abs_error_pct']:.1f}%)")
    return 0


def _lut_model_space(args):
    """The model and channel space a table is for: a supernet run folder's, or TARGET's."""
    from compress.models.zoo import example_input
    from compress.space import ChannelSpace
    target = Path(args.target)
    if target.is_dir() or target.name == "supernet.pt":
        from compress.supernet import load_supernet
        supernet, _ = load_supernet(target)
        return supernet.plain_copy().eval(), supernet.space
    model = _load(args).eval()
    if model.compress_cfg.get("config") is not None:
        raise CompressError(f"'{args.target}' is pruned; build the table for the unpruned model or its supernet.")
    size = model.compress_cfg["input_size"]
    return model, ChannelSpace.from_model(model, example_input(size, model), divisor=args.divisor,
                                          min_ratio=args.min_width)


def cmd_extract(args) -> int:
    from compress.checkpoint import save_checkpoint
    from compress.search import RESULT_FILE
    from compress.supernet import recalibrate_bn
    from compress.units import parse_count
    run_dir = Path(args.run_dir)
    search_dir = _find_search(run_dir, args.search)
    result = json.loads((search_dir / RESULT_FILE).read_text())
    targets = result["targets"]
    if args.target is None:
        if len(targets) != 1:
            raise CompressError(f"{search_dir / RESULT_FILE} has {len(targets)} targets "
                                f"({', '.join(t['label'] for t in targets)}); pick one with --target.")
        entry = targets[0]
    else:
        wanted = [t for t in targets if args.target in (t["label"], t["label"].split("<=")[-1])]
        if not wanted and all(t["budget"]["macs"] for t in targets):
            full = result["full"]["macs"]
            macs = parse_count(args.target, "MAC target", full=full)
            wanted = [t for t in targets if abs(t["budget"]["macs"] - macs) <= 0.001 * full]
        if not wanted:
            raise CompressError(f"no target '{args.target}' in {search_dir / RESULT_FILE}; it has "
                                f"{', '.join(t['label'] for t in targets)}.")
        entry = wanted[0]
    args.data = None
    args.recal_images = result["evaluation"]["recal_images"]
    args.eval_images = result["evaluation"]["eval_images"]
    supernet, record, evaluator = _search_setup(args, run_dir, search_dir)
    recalibrate_bn(supernet, entry["config"], evaluator.held_out.batches("recal"))
    model = supernet.extract(entry["config"])
    saved = save_checkpoint(args.output, model, provenance={
        "created_by": "chansearch extract", "supernet": str(run_dir), "method": record["method"],
        "search": str(search_dir), "target": entry["label"], "heldout_top1": entry["top1"]})
    print(f"{entry['label']}: {saved['macs'] / 1e6:.2f}M MACs, {saved['params'] / 1e6:.2f}M params, held-out "
          f"top-1 {entry['top1']:.2%} in the supernet; saved {args.output}")
    return 0


def _find_search(run_dir: Path, search: str | None) -> Path:
    from compress.search import RESULT_FILE
    if search:
        path = Path(search)
        if not (path / RESULT_FILE).is_file():
            raise CompressError(f"'{path}' holds no {RESULT_FILE}; run `chansearch search` first.")
        return path
    found = sorted(p.parent for p in run_dir.glob(f"search-*/{RESULT_FILE}"))
    if not found:
        raise CompressError(f"'{run_dir}' holds no search results (search-*/{RESULT_FILE}); run "
                            f"`chansearch search {run_dir} --macs ...` first.")
    if len(found) > 1:
        raise CompressError(f"'{run_dir}' holds several searches ({', '.join(p.name for p in found)}); "
                            "choose one with --search DIR.")
    return found[0]


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


# ---- run ------------------------------------------------------------------------------------
def cmd_run(args) -> int:
    from compress.recipe import dump, load_recipe
    if args.print_config:
        print(dump(load_recipe(args.recipe, args.overrides)), end="")
        return 0
    from compress.pipeline import run_recipe
    return run_recipe(args.recipe, args.overrides, quiet=args.quiet)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chansearch", formatter_class=_formatter,
        description="Compress CNNs for edge devices: channel spaces, pruning, supernets, search, export.",
        epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("run", help="run a YAML recipe end to end (resumable; torchrun-ready)",
                       formatter_class=_formatter,
                       epilog="Re-running the same command resumes: finished stages are skipped, an interrupted one "
                              "continues, a stage whose settings changed runs again with those after it. Exit status "
                              "3 when a parity or latency check fails (after writing report.md).")
    p.add_argument("recipe", metavar="RECIPE.yaml", help="recipe file (see recipes/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override recipe keys, e.g. finetune.epochs=2")
    p.add_argument("--print-config", action="store_true", help="print the resolved recipe with every default, then exit")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    p.set_defaults(func=cmd_run)

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
    p.add_argument("--images", type=int, default=0,
                   help="evaluate this many images picked at random with --seed (0 = all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --images pick")
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
    p.add_argument("--from-scratch", action="store_true",
                   help="TARGET is a (pruned) checkpoint: train its architecture from a fresh initialisation "
                        "instead of its weights, as MetaPruning retrains a searched net")
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

    p = sub.add_parser("supernet", help="train a weight-sharing supernet (slimmable or PruningNet); torchrun-ready",
                       formatter_class=_formatter, epilog=EPILOG + " Resume an interrupted run with --resume RUN_DIR.")
    _model_args(p, resumable=True)
    p.add_argument("--method", default="slimmable", choices=["slimmable", "pruningnet"],
                   help="US-Nets/AutoSlim slimmable network, or MetaPruning's PruningNet")
    p.add_argument("--min-width", type=float, default=0.25, help="smallest width ratio of each group")
    p.add_argument("--divisor", type=int, default=8, help="widths are multiples of this")
    s_ = p.add_argument_group("slimmable")
    s_.add_argument("--num-random", type=int, default=2, help="random configs per step besides max and min")
    s_.add_argument("--uniform", action="store_true", help="random configs as one width multiplier, not per group")
    s_.add_argument("--no-distill", action="store_true", help="no in-place distillation from the max config")
    s_.add_argument("--no-reorder", action="store_true", help="keep a pretrained model's channel order "
                    "(default: most important channels first)")
    s_ = p.add_argument_group("pruningnet")
    s_.add_argument("--hidden", type=int, default=32, help="hidden units of each layer's hypernetwork")
    s_ = p.add_argument_group("held-out scoring after training")
    s_.add_argument("--recal-images", type=int, default=2000, help="images to recalibrate BN")
    s_.add_argument("--eval-images", type=int, default=5000, help="images to score")
    _train_args(p)
    p.add_argument("--out", default="runs/supernet", help="run folder: last.pt, metrics.jsonl, supernet.pt")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue this run folder with its own settings")
    p.set_defaults(func=cmd_supernet, holdout=5000)

    p = sub.add_parser("search", help="search a trained supernet's configs under MAC/param/latency budgets",
                       formatter_class=_formatter,
                       epilog="Results go to RUN_DIR/search-METHOD (search.json, search.csv, search.png). "
                              "Running the same command again resumes; nothing is scored twice.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder of `chansearch supernet` (or its supernet.pt)")
    p.add_argument("--method", default="evolution", choices=["evolution", "random", "greedy"], help="strategy")
    p.add_argument("--macs", help="MAC budgets, comma-separated (150M,100M or 50%%,30%%); - = no limit for that target")
    p.add_argument("--params", help="parameter budget(s)")
    p.add_argument("--latency-ms", help="latency budget(s) in ms, predicted with --lut")
    p.add_argument("--lut", help="latency table of this space (`chansearch lut`)")
    p.add_argument("--recal-images", type=int, default=2000, help="held-out images to recalibrate BN per candidate")
    p.add_argument("--eval-images", type=int, default=5000, help="held-out images to score each candidate")
    p.add_argument("--data", metavar="SPEC", help="the supernet's data at another path (default: as trained)")
    g = p.add_argument_group("evolution")
    g.add_argument("--population", type=int, default=50, help="population size")
    g.add_argument("--parents", type=int, default=10, help="top-k parents")
    g.add_argument("--mutations", type=int, default=25, help="mutants per iteration")
    g.add_argument("--crossovers", type=int, default=25, help="crossovers per iteration")
    g.add_argument("--iterations", type=int, default=20, help="iterations")
    g.add_argument("--mutation-prob", type=float, default=0.1, help="mutation probability per group")
    p.add_argument("--samples", type=int, default=1000, help="configs per budget (random)")
    p.add_argument("--greedy-step", type=float, default=0.1,
                   help="share of a group's full width removed per greedy trial (down to its smallest width)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--out", default=None, help="results folder (default: RUN_DIR/search-METHOD)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("lut", help="per-layer latency table of a channel space on a runtime (for --latency-ms search)",
                       formatter_class=_formatter,
                       epilog="TARGET is a zoo name, an unpruned checkpoint, or a `chansearch supernet` run folder "
                              "(its space is used). Build the table on the machine the model will run on.")
    _model_args(p, pretrained=False)
    p.add_argument("--backend", default="tflite", choices=["tflite", "onnxruntime"], help="runtime to time")
    p.add_argument("--threads", type=int, default=1, help="inference threads")
    p.add_argument("--grid", type=int, default=4, help="widths timed per layer dimension")
    p.add_argument("--anchors", type=int, default=6, help="whole models timed to fit the table to real latency")
    p.add_argument("--check", type=int, default=0, help="random configs timed to report the table's accuracy")
    p.add_argument("--runs", type=int, default=30, help="timed runs per measurement")
    p.add_argument("--warmup", type=int, default=5, help="warm-up runs per measurement")
    p.add_argument("--divisor", type=int, default=8, help="width divisor of the space (zoo/checkpoint TARGET)")
    p.add_argument("--min-width", type=float, default=0.25, help="smallest width ratio (zoo/checkpoint TARGET)")
    p.add_argument("-o", "--output", required=True, help="table file (.json)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_lut)

    p = sub.add_parser("extract", help="materialize a searched config as a standalone pruned checkpoint",
                       formatter_class=_formatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder of `chansearch supernet`")
    p.add_argument("--target", help="which budget of the search: its label or MAC target (e.g. 150M)")
    p.add_argument("--search", default=None, help="search folder (default: the one RUN_DIR/search-* folder)")
    p.add_argument("-o", "--output", required=True, type=Path, help="output checkpoint (.pt)")
    p.set_defaults(func=cmd_extract)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "command", None) == "run" and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra  # KEY=VALUE overrides given after the flags
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
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
