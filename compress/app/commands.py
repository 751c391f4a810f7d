"""What each `chansearch` command does once its flags are parsed: load what it names, call one
function of the stage API, print. The parser itself is `compress.app.cli`."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from compress.app.flags import settings_from
from compress.units import format_score
from compress.errors import CheckFailed, CompressError
from compress.settings import (DataSettings, ExportSettings, FinetuneSettings, HeldOutScoring, LatencySettings,
                               LutSettings, ModelSettings, PruneSettings, SearchSettings, SupernetSettings,
                               TrainSettings)


def _load(args, from_scratch: bool = False):
    from compress.checkpoint import load_target
    m = settings_from(ModelSettings, args, name=args.target)
    return load_target(m.name, num_classes=m.num_classes, width_mult=m.width_mult, pretrained=m.pretrained,
                       input_size=m.input_size, from_scratch=from_scratch, trust_code=m.trust_code, task=m.task)


# what `eval` prints of each task's metrics
SCORES = {"top1": "top-1", "top5": "top-5", "miou": "mIoU", "pixel_acc": "pixel accuracy", "recall1": "recall@1",
          "map": "mAP", "map_50": "mAP@0.5", "psnr": "PSNR", "ssim": "SSIM"}


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=1, default=str))


def _record(args) -> dict:
    """The parsed arguments, as a run folder keeps them to resume the run."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}


def _resumed(args, command: str) -> argparse.Namespace:
    """With --resume RUN_DIR, the run's own saved arguments (only --quiet may change)."""
    from compress.stages.folders import ARGS_FILE
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
                        width=args.width, latency=args.latency, clock=settings_from(LutSettings, args),
                        latency_model=args.latency_model,
                        output=args.output, provenance={"created_by": "chansearch prune", "parent": args.target},
                        data=args.data, progress=not args.json)
    if args.json:
        _print_json({"output": str(args.output), "macs_before": done.macs_before, "params_before": done.params_before,
                     "macs": done.macs, "params": done.params, "config": done.model.card.config,
                     **({"latency": done.latency} if done.latency else {})})
        return 0
    print(f"before: {human(done.macs_before)} MACs, {human(done.params_before)} params")
    print(f"after:  {human(done.macs)} MACs ({done.macs / done.macs_before:.1%}), "
          f"{human(done.params)} params ({done.params / done.params_before:.1%})")
    if done.latency:
        t = done.latency
        print(f"latency: {t['measured_ms']:.3f} ms measured ({t['predicted_ms']:.3f} ms predicted) on {t['clock']}, "
              f"budget {t['budget_ms']:.3f} ms, after {len(t['attempts'])} cut(s)")
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
    ds = random_subset(eval_set(args.data, card.input_size, card.mean, card.std, card.label_classes),
                       args.images, args.seed)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    metrics = evaluate(model.to(device), loader(ds, args.batch_size, workers=args.workers), device,
                       progress=not args.json and sys.stderr.isatty())
    if args.json:
        _print_json(metrics)
    else:
        scores = ", ".join(f"{label} {format_score(key, metrics[key])}" for key, label in SCORES.items()
                           if key in metrics)
        print(f"{args.target} on {args.data}: {scores}, loss {metrics['loss']:.4f} ({metrics['images']} images)")
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
    settings = settings_from(SearchSettings, args, targets=targets_from_lists(args.macs, args.params, args.latency))
    # --samples is the random search's; the latency model keeps the size `prune --latency` caches
    clock = settings_from(LutSettings, args, samples=LutSettings().samples)
    done = stages.search(args.run_dir, settings, out=args.out, lut=args.lut, data=args.data, clock=clock,
                         quiet=args.quiet or args.json)  # --json: stdout holds the JSON alone
    result = done.result
    if args.json:
        _print_json(result)
    elif distributed.is_main():
        full = result["full"]
        print(f"full config: {full['macs'] / 1e6:.2f}M MACs, held-out top-1 {full['top1']:.2%}")
        for t in result["targets"]:
            lat = f", {t['latency_ms']:.3f} ms predicted" if t.get("latency_ms") is not None else ""
            meas = f", {t['measured_ms']:.3f} ms measured" if t.get("measured_ms") is not None else ""
            if len(t.get("latency_attempts", ())) > 1:
                meas += f" (pick {len(t['latency_attempts'])} of a search corrected by the measurement)"
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
    from compress.latency.layers import tile_name
    target = Path(args.target)
    is_run = target.is_dir() or target.name == "supernet.pt"
    model, space = stages.lut_model_space(target if is_run else _load(args), args.divisor, args.min_width)
    settings = settings_from(LutSettings, args)
    fitted = stages.latency_table(model, space, settings, args.output, progress=not args.quiet)
    record = fitted.record
    built = (f"this machine's cached model (built {record.get('built', 'earlier')} in {record['build_s']:.0f} s; "
             "--rebuild times it anew)" if fitted.from_cache else f"in {record['build_s']:.0f} s")
    print(f"wrote {args.output}: latency model of {len(record['layers'])} layers fitted on {settings.samples} "
          f"whole models timed on {record['clock']['dtype']} {settings.runtime}, {settings.threads} thread(s), "
          f"{built}; unpruned {record['unpruned_ms']:.3f} ms, smallest config {record['floor_ms']:.3f} ms")
    size, inputs_too = record["fit"]["tile"]
    tile = f"{size} channels ({'inputs and outputs' if inputs_too else 'outputs'} rounded up)" if size > 1 else "none"
    error = record["fit"]["left_out_error"][tile_name((size, inputs_too))]
    print(f"the kernels' channel tile, fitted: {tile}; leave-one-out error on the samples {error:.1%}")
    for r in record["fit"].get("retimed", []):
        print(f"sample {r['sample']} timed again: {r['first_ms']:.3f} ms, then "
              f"{', '.join(f'{ms:.3f}' for ms in r['again_ms'])} ms; kept the median, {r['kept_ms']:.3f} ms")
    if settings.check:
        c = record["check"]
        print(f"check on {c['configs']} random configs: {c['within_10pct']:.0%} within +-10% and "
              f"{c['within_5pct']:.0%} within +-5% of the measured latency (mean |error| "
              f"{c['mean_abs_error_pct']:.1f}%, max {c['max_abs_error_pct']:.1f}%); two timings of one file here agree "
              f"within +-5% for {c['retimed_within_5pct']:.0%} of them (mean |difference| "
              f"{c['retimed_mean_abs_diff_pct']:.1f}%)")
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
    nearest = (f", same nearest neighbour {p['nearest_agreement']:.1%}" if "nearest_agreement" in p else
               f", same class on {p['pixel_agreement']:.1%} of pixels" if "pixel_agreement" in p else
               f", PSNR {p['psnr_db']:.1f} dB" if "psnr_db" in p else
               f" ({p['reference_boxes']} float detections)" if "reference_boxes" in p else "")
    print(f"parity on {where}: {p.get('agreement_of', 'top-1')} agreement with PyTorch "
          f"{p['top1_agreement']:.1%}{nearest}, "
          f"max |diff| {p['max_abs_diff']:.3g}" + (f"; top-1 accuracy {p['accuracy']['float']:.1%} float (PyTorch), "
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
        print(dump(load_recipe(args.recipe, args.overrides), comments=True), end="")
        return 0
    return run_recipe(args.recipe, args.overrides, quiet=args.quiet)
