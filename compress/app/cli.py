"""`chansearch`: the command line. Each command parses its flags (generated from the stage's
settings model), loads what it names, calls one function of the stage API and prints."""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from compress.errors import CheckFailed, CompressError
from compress.app.flags import add_flags, settings_from, word_for_cli
from compress.logs import quiet_runtimes, show_notes
from compress.settings import (DataSettings, ExportSettings, FinetuneSettings, HeldOutScoring, LatencySettings,
                               LutSettings, ModelSettings, PruneSettings, SearchSettings, SupernetSettings,
                               TrainSettings)

EPILOG = ("TARGET is a zoo name (`chansearch models`), a model source (torchvision:resnet50, timm:efficientnet_lite0, "
          "path/to/file.py:factory, package.module:factory) or a compress checkpoint (.pt).")
DATA_HELP = "cifar10:DIR, imagefolder:DIR, npz:FILE or synthetic:N"


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
                   help="zoo name, model source or checkpoint path" + (" (not with --resume)" if resumable else ""))
    add_flags(p, ModelSettings, skip=("name",) if pretrained else ("name", "pretrained"))


def _load(args, from_scratch: bool = False):
    from compress.checkpoint import load_target
    m = settings_from(ModelSettings, args, name=args.target)
    return load_target(m.name, num_classes=m.num_classes, width_mult=m.width_mult, pretrained=m.pretrained,
                       input_size=m.input_size, from_scratch=from_scratch, trust_code=m.trust_code)


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=1, default=str))


def _record(args) -> dict:
    """The parsed arguments, as a run folder keeps them to resume the run."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}


def _resumed(args, command: str) -> argparse.Namespace:
    """With --resume RUN_DIR, the run's own saved arguments (only --quiet may change)."""
    from compress.stages import ARGS_FILE
    if not args.resume:
        if not args.target or not args.data:
            raise CompressError(f"`chansearch {command}` needs a TARGET and --data SPEC "
                                "(or --resume RUN_DIR to continue a run).")
        return args
    saved = Path(args.resume) / ARGS_FILE
    if not saved.is_file():
        raise CompressError(f"cannot resume '{args.resume}': it has no {ARGS_FILE} (not a "
                            f"`chansearch {command}` run folder).")
    old = argparse.Namespace(**{**vars(args), **json.loads(saved.read_text())})
    old.quiet, old.resume = args.quiet, args.resume
    return old


# ---- models / profile -----------------------------------------------------------------------
def cmd_models(args) -> int:
    from compress.models import ZOO, build
    from compress.pruning.profile import count
    from compress.units import human
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


def cmd_profile(args) -> int:
    from compress.pruning.profile import profile_model
    from compress.units import human
    report = profile_model(_load(args), divisor=args.divisor)
    if args.json:
        _print_json(report)
        return 0
    print(f"{args.target}: {human(report['macs'])} MACs, {human(report['params'])} params "
          f"at {report['input_size']}x{report['input_size']}, {report['num_classes']} classes")
    print(f"{'group':<36}{'width':>7}{'max':>7}{'ratio':>7}")
    for g in report["groups"]:
        print(f"{g['name']:<36}{g['width']:>7}{g['max']:>7}{g['width'] / g['max']:>7.2f}")
    return 0


# ---- prune / eval ---------------------------------------------------------------------------
def cmd_prune(args) -> int:
    from compress import stages
    from compress.units import human
    settings = settings_from(PruneSettings, args)
    done = stages.prune(_load(args), settings, macs=args.macs, params=args.params, config=args.config,
                        width=args.width,
                        output=args.output, provenance={"created_by": "chansearch prune", "parent": args.target},
                        data=args.data, progress=not args.json)
    if args.json:
        _print_json({"output": str(args.output), "macs_before": done.macs_before, "params_before": done.params_before,
                     "macs": done.macs, "params": done.params, "config": done.model.card.config})
        return 0
    print(f"before: {human(done.macs_before)} MACs, {human(done.params_before)} params")
    print(f"after:  {human(done.macs)} MACs ({done.macs / done.macs_before:.1%}), "
          f"{human(done.params)} params ({done.params / done.params_before:.1%})")
    if "reconstructed_on" in done.restored:
        print(f"pruned layers refitted to the unpruned outputs on {done.restored['reconstructed_on']} training "
              f"images of {args.data}")
    elif "bn_recalibrated_on" in done.restored:
        print(f"BN statistics re-estimated on {done.restored['bn_recalibrated_on']} training images of {args.data}")
    elif not args.data:
        print("no --data: channels ranked by weight magnitude and nothing refitted; a trained net keeps far more "
              "accuracy when pruned with --data (energy ranking, layers refitted to the unpruned outputs)")
    print(f"saved {args.output}")
    return 0


def cmd_eval(args) -> int:
    import torch
    from compress.data.specs import eval_set, loader, random_subset
    from compress.training.evaluate import evaluate
    if args.images < 0:
        raise CompressError(f"--images {args.images}: give a number of images to evaluate, or 0 for all.")
    model = _load(args)
    card = model.card
    ds = random_subset(eval_set(args.data, card.input_size, card.mean, card.std, card.num_classes),
                       args.images, args.seed)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    metrics = evaluate(model.to(device), loader(ds, args.batch_size, workers=args.workers), device,
                       progress=not args.json and sys.stderr.isatty())
    if args.json:
        _print_json(metrics)
    else:
        print(f"{args.target} on {args.data}: top-1 {metrics['top1']:.2%}, top-5 {metrics['top5']:.2%}, "
              f"loss {metrics['loss']:.4f} ({metrics['images']} images)")
    return 0


# ---- train / finetune / supernet ------------------------------------------------------------
def _data(args) -> DataSettings:
    return settings_from(DataSettings, args, spec=args.data)


def cmd_train(args) -> int:
    import torch
    from compress import stages
    args = _resumed(args, "train")
    settings = settings_from(TrainSettings, args)
    torch.manual_seed(settings.seed)  # the initial weights, identical on every rank and rerun
    model = _load(args, from_scratch=args.from_scratch)
    done = stages.train(model, _data(args), settings, args.out, teacher=_teacher(args), resume=bool(args.resume),
                        quiet=args.quiet, record=_record(args), provenance={
                            "created_by": "chansearch train", "parent": args.target, "from_scratch": args.from_scratch})
    print(f"saved {done.checkpoint}")
    return 0


def _teacher(args):
    from compress.checkpoint import load_target
    return load_target(args.teacher, trust_code=args.trust_code) if args.teacher else None


def cmd_finetune(args) -> int:
    from compress import stages
    args = _resumed(args, "finetune")
    if not args.output:
        raise CompressError("`chansearch finetune` needs -o OUT.pt, the fine-tuned checkpoint to write.")
    output = Path(args.output)
    args.run_dir = str(args.run_dir or output.with_name(output.stem + "_run"))
    done = stages.train(_load(args), _data(args), settings_from(FinetuneSettings, args), args.run_dir, output=output,
                        teacher=_teacher(args), resume=bool(args.resume), quiet=args.quiet, record=_record(args), provenance={
                            "created_by": "chansearch finetune", "parent": args.target, "teacher": args.teacher})
    print(f"saved {done.checkpoint}")
    return 0


def cmd_supernet(args) -> int:
    import torch
    from compress import stages
    from compress.training import distributed
    args = _resumed(args, "supernet")
    settings = settings_from(SupernetSettings, args)
    torch.manual_seed(settings.seed)
    from compress.checkpoint import is_checkpoint_path
    trained = args.pretrained is not None or is_checkpoint_path(args.target)  # a checkpoint holds trained weights
    done = stages.train_supernet(_load(args), _data(args), settings, args.out,
                                 scoring=settings_from(HeldOutScoring, args), pretrained=trained,
                                 resume=bool(args.resume), quiet=args.quiet, record=_record(args))
    if distributed.is_main():
        print(f"saved {done.checkpoint}")
        for name, e in done.summary.items():
            print(f"{name} config: {e['macs'] / 1e6:.2f}M MACs, held-out top-1 {e['top1']:.2%} "
                  f"(BN recalibrated on {args.recal_images} images)")
    return 0


# ---- search / extract / lut -----------------------------------------------------------------
def cmd_search(args) -> int:
    from compress import stages
    from compress.training import distributed
    from compress.search import targets_from_lists
    settings = settings_from(SearchSettings, args, targets=targets_from_lists(args.macs, args.params, args.latency_ms))
    done = stages.search(args.run_dir, settings, out=args.out, lut=args.lut, data=args.data, quiet=args.quiet)
    result = done.result
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
        print(f"{result['evaluated']} configs scored ({result['evaluated_now']} now); wrote "
              f"{done.folder / 'search.json'}, search.csv, search.png")
    return 0


def cmd_extract(args) -> int:
    from compress import stages
    teacher = None
    if args.teacher:
        from compress.checkpoint import load_target
        teacher = load_target(str(args.teacher))
    done = stages.extract(args.run_dir, args.output, target=args.target, search_dir=args.search,
                          provenance={"created_by": "chansearch extract"}, teacher=teacher)
    t = done.target
    source = f"cut from {args.teacher} and refitted" if teacher is not None else "extracted"
    print(f"{t['label']}: {t['macs'] / 1e6:.2f}M MACs, {t['params'] / 1e6:.2f}M params, held-out "
          f"top-1 {t['top1']:.2%} in the supernet, {done.heldout_top1:.2%} {source}; saved {args.output}")
    return 0


def cmd_lut(args) -> int:
    from compress import stages
    target = Path(args.target)
    is_run = target.is_dir() or target.name == "supernet.pt"
    model, space = stages.lut_model_space(target if is_run else _load(args), args.divisor, args.min_width)
    settings = settings_from(LutSettings, args)
    record = stages.latency_table(model, space, settings, args.output, progress=not args.quiet)
    print(f"wrote {args.output}: {len(record['layers'])} layers ({record['unique_layers']} distinct timings) on "
          f"{settings.backend}, {settings.threads} thread(s); fit: {record['fit']['a']:.3f} x layer sum + "
          f"{record['fit']['b']:.3f} ms")
    if settings.check:
        c = record["check"]
        print(f"check on {c['configs']} random configs: {c['within_10pct']:.0%} within +-10% of the measured latency "
              f"(mean |error| {c['mean_abs_error_pct']:.1f}%, max {c['max_abs_error_pct']:.1f}%)")
    return 0


# ---- export / latency -----------------------------------------------------------------------
def cmd_export(args) -> int:
    from compress import stages
    settings = settings_from(ExportSettings, args, formats=[args.format])
    try:
        report = stages.export(_load(args), args.format, args.output, settings, data=args.calib_data,
                               input_size=args.input_size)
    except CheckFailed as exc:  # the file and its numbers are still the user's to see
        if exc.report:
            _print_export(exc.report, args)
        raise
    _print_export(report, args)
    return 0


def _print_export(report: dict, args) -> None:
    if args.json:
        _print_json(report)
        return
    p, mode = report["parity"], report["quantize"]
    size = f"{report['bytes'] / 1e6:.2f} MB" + (f", {report['bytes'] / report['float_bytes']:.2f}x the float file"
                                              if mode else "")
    print(f"wrote {report['path']} ({mode or 'float'}, {size})")
    where = f"{p['images']} {'real' if args.calib_data else 'random'} images"
    print(f"parity on {where}: top-1 agreement with PyTorch {p['top1_agreement']:.1%}, max |diff| "
          f"{p['max_abs_diff']:.3g}" + (f"; top-1 accuracy {p['accuracy']['float']:.1%} float (PyTorch), "
                                        f"{p['accuracy']['exported']:.1%} this file" if "accuracy" in p else ""))
    if report.get("keep_float"):
        print(f"kept in float (most sensitive to int8): {', '.join(report['keep_float'])}")
    if mode == "int8_io":
        from compress.export.litert import input_note
        print(input_note(report))


def cmd_latency(args) -> int:
    from compress import stages
    from compress.export.latency import check_budget
    settings = settings_from(LatencySettings, args)
    result = stages.latency(args.model, settings)
    if args.json:
        _print_json(result)
    else:
        print(f"{result['model']} on {result['backend']} ({result['runtime']}, {result['device']}, "
              f"{result['threads']} thread(s), {result['runs']} runs): median {result['median_ms']:.3f} ms, "
              + (f"p90 {result['p90_ms']:.3f} ms, " if result["p90_ms"] is not None else "")
              + f"min {result['min_ms']:.3f} ms, std {result['std_ms']:.3f} ms")
    if settings.budget_ms is not None:
        check_budget(result, settings.budget_ms)
    return 0


# ---- run ------------------------------------------------------------------------------------
def cmd_run(args) -> int:
    from compress.app.pipeline import run_recipe
    from compress.app.recipe import dump, load_recipe
    if args.print_config:
        print(dump(load_recipe(args.recipe, args.overrides)), end="")
        return 0
    return run_recipe(args.recipe, args.overrides, quiet=args.quiet)


# ---- the parser -----------------------------------------------------------------------------
def _run_flags(p: argparse.ArgumentParser, out: str, what: str) -> None:
    p.add_argument("--out", default=out, help=f"run folder: {what}")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue this run folder with its own settings")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def _training_flags(p: argparse.ArgumentParser, settings: type, skip: tuple[str, ...] = ()) -> None:
    p.add_argument("--data", metavar="SPEC", help=f"{DATA_HELP} (required)")
    p.add_argument("--teacher", default=None, metavar="TARGET", help="distill from this zoo model or checkpoint")
    add_flags(p, DataSettings, skip=("spec",), title="data")
    add_flags(p, settings, skip=skip, title="training")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chansearch", formatter_class=_formatter,
        description="Compress CNNs for edge devices: channel spaces, pruning, supernets, search, export.",
        epilog=EPILOG)
    parser.add_argument("--verbose", action="store_true", help="show the runtimes' own log lines (TensorFlow, "
                        "absl, XNNPACK) and library warnings")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help: str, epilog: str | None = EPILOG) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, formatter_class=_formatter, epilog=epilog)

    p = command("run", "run a YAML recipe end to end (resumable; torchrun-ready)",
                "Re-running the same command resumes: finished stages are skipped, an interrupted one continues, a "
                "stage whose settings changed runs again with those after it. Exit status 3 when a parity or latency "
                "check fails (after writing report.md).")
    p.add_argument("recipe", metavar="RECIPE.yaml", help="recipe file (see recipes/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override recipe keys, e.g. finetune.epochs=2")
    p.add_argument("--print-config", action="store_true", help="print the resolved recipe with every default, then exit")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    p.set_defaults(func=cmd_run)

    p = command("models", "list the zoo models with MACs and params", None)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_models)

    p = command("profile", "MACs, params and channel groups of a model")
    _model_args(p)
    p.add_argument("--divisor", type=int, default=8, help="width divisor of the channel space")
    p.add_argument("--json", action="store_true", help="print one JSON object (macs, params, groups)")
    p.set_defaults(func=cmd_profile)

    p = command("prune", "prune a model to a channel config, MAC target or width")
    _model_args(p)
    how = p.add_mutually_exclusive_group()
    how.add_argument("--config", metavar="FILE.json", help="channel config: group name -> width")
    how.add_argument("--macs", metavar="150M", help="MAC budget (150M, 1.2G, 50%% of the model); with --params, "
                     "both are met")
    how.add_argument("--width", type=float, metavar="0.75", help="uniform width multiplier")
    p.add_argument("--params", metavar="1.2M", help="parameter budget (1.2M, 40%% of the model)")
    add_flags(p, PruneSettings)
    p.add_argument("--data", metavar="SPEC", help="training images to rank channels on (--importance auto/energy) "
                   "and to refit the pruned layers on (--reconstruct-images of them; or re-estimate BN on "
                   "--recal-images); without it channels are ranked by weight magnitude and nothing is refitted")
    p.add_argument("-o", "--output", required=True, type=Path, help="output checkpoint (.pt)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_prune)

    p = command("eval", "top-1/top-5 accuracy and loss on a data set")
    _model_args(p)
    p.add_argument("--data", required=True, metavar="SPEC", help=DATA_HELP)
    p.add_argument("--batch-size", type=int, default=256, help="images per batch")
    p.add_argument("--workers", type=int, default=2, help="data loader processes")
    p.add_argument("--images", type=int, default=0, help="evaluate this many images picked at random with --seed "
                   "(0 = all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --images pick")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--json", action="store_true", help="print JSON with top1, top5, loss")
    p.set_defaults(func=cmd_eval)

    p = command("export", "export to ONNX or TFLite (float/int8) and check parity with PyTorch")
    _model_args(p)
    p.add_argument("--format", required=True, choices=["onnx", "tflite"], help="output format")
    p.add_argument("-o", "--output", required=True, type=Path, help="output file (.onnx / .tflite)")
    p.add_argument("--calib-data", metavar="SPEC", help="real images: training split calibrates static int8, "
                   "evaluation split checks parity and accuracy (default parity input: random)")
    add_flags(p, ExportSettings)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_export)

    p = command("latency", "measure latency of an .onnx/.tflite file, here or on a phone; budget check",
                "Exit status 3 when the median is over --budget-ms (for CI pipelines).")
    p.add_argument("model", metavar="MODEL_FILE", help=".onnx or .tflite file")
    add_flags(p, LatencySettings)
    p.add_argument("--json", action="store_true", help="print JSON (median_ms, p90_ms, ...)")
    p.set_defaults(func=cmd_latency)

    p = command("train", "train a model (from scratch or pretrained); torchrun-ready",
                EPILOG + " Resume an interrupted run with --resume RUN_DIR.")
    _model_args(p, resumable=True)
    _training_flags(p, TrainSettings)
    p.add_argument("--from-scratch", action="store_true",
                   help="TARGET is a (pruned) checkpoint: train its architecture from a fresh initialisation "
                        "instead of its weights, as MetaPruning retrains a searched net")
    _run_flags(p, "runs/train", "last.pt, metrics.jsonl, model.pt")
    p.set_defaults(func=cmd_train)

    p = command("finetune", "fine-tune a (pruned) checkpoint, optionally distilling from a teacher")
    p.add_argument("target", metavar="CKPT", nargs="?", help="checkpoint to fine-tune (not with --resume)")
    add_flags(p, ModelSettings, skip=("name", "pretrained", "num_classes", "width_mult"))
    _training_flags(p, FinetuneSettings, skip=("from_scratch", "distill"))
    p.add_argument("-o", "--output", help="fine-tuned checkpoint (.pt; required)")
    p.add_argument("--run-dir", default=None, help="run folder (default: OUTPUT's name + _run)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue this run folder with its own settings")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_finetune)

    p = command("supernet", "train a weight-sharing supernet (slimmable or PruningNet); torchrun-ready",
                EPILOG + " Resume an interrupted run with --resume RUN_DIR.")
    _model_args(p, resumable=True)
    add_flags(p, HeldOutScoring, title="held-out scoring after training")
    _training_flags(p, SupernetSettings, skip=("qat_epochs",))
    _run_flags(p, "runs/supernet", "last.pt, metrics.jsonl, supernet.pt")
    p.set_defaults(func=cmd_supernet)

    p = command("search", "search a trained supernet's configs under MAC/param/latency budgets",
                "Results go to RUN_DIR/search-METHOD (search.json, search.csv, search.png). "
                "Running the same command again resumes; nothing is scored twice.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder of `chansearch supernet` (or its supernet.pt)")
    p.add_argument("--macs", help="MAC budgets, comma-separated (150M,100M or 50%%,30%%); - = no limit for that target")
    p.add_argument("--params", help="parameter budget(s)")
    p.add_argument("--latency-ms", help="latency budget(s) in ms, predicted with --lut")
    p.add_argument("--lut", help="latency table of this space (`chansearch lut`)")
    p.add_argument("--data", metavar="SPEC", help="the supernet's data at another path (default: as trained)")
    add_flags(p, SearchSettings)
    p.add_argument("--out", default=None, help="results folder (default: RUN_DIR/search-METHOD)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_search)

    p = command("lut", "per-layer latency table of a channel space on a runtime (for --latency-ms search)",
                "TARGET is a zoo name, an unpruned checkpoint, or a `chansearch supernet` run folder (its space is "
                "used). Build the table on the machine the model will run on.")
    _model_args(p, pretrained=False)
    add_flags(p, LutSettings)
    p.add_argument("--divisor", type=int, default=8, help="width divisor of the space (zoo/checkpoint TARGET)")
    p.add_argument("--min-width", type=float, default=0.25, help="smallest width ratio (zoo/checkpoint TARGET)")
    p.add_argument("-o", "--output", required=True, help="table file (.json)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_lut)

    p = command("extract", "materialize a searched config as a standalone pruned checkpoint", None)
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder of `chansearch supernet`")
    p.add_argument("--target", help="which budget of the search: its label or MAC target (e.g. 150M)")
    p.add_argument("--search", default=None, help="search folder (default: the one RUN_DIR/search-* folder)")
    p.add_argument("--teacher", type=Path, default=None,
                   help="the unpruned checkpoint the supernet was trained from: cut the searched widths from its "
                        "weights the way `prune --data` does (refit included) instead of taking the supernet's")
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
    if not (debug or args.verbose):
        quiet_runtimes()
    show_notes()
    try:
        with warnings.catch_warnings():
            if not (debug or args.verbose):  # library deprecation chatter is noise to a CLI user
                warnings.filterwarnings("ignore", category=DeprecationWarning)
                warnings.filterwarnings("ignore", category=FutureWarning)
            return args.func(args) or 0
    except CompressError as exc:
        print(f"chansearch {args.command}: error: {word_for_cli(str(exc), set(vars(args)))}", file=sys.stderr)
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
