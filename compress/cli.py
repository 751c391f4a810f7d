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


def _formatter(prog):
    return argparse.ArgumentDefaultsHelpFormatter(prog, max_help_position=32)


def _model_args(p: argparse.ArgumentParser, pretrained: bool = True) -> None:
    p.add_argument("target", metavar="TARGET", help="zoo name or checkpoint path")
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
    except Exception as exc:  # an internal bug: one clear paragraph, traceback only on request
        if debug:
            raise
        print(f"chansearch {args.command}: internal error: {type(exc).__name__}: {exc}. This is a bug in "
              "compress; rerun with COMPRESS_DEBUG=1 for the traceback and report it.", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
