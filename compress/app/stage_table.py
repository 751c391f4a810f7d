"""The recipe's stages as a table: each a small object naming its folder, the recipe settings
its result depends on, the stages it reads, whether it runs on every torchrun rank, its typed
result, and what it does, which is one call of the stage API (`compress.stages`) per model,
with the equivalent `chansearch` command recorded from the same settings objects. The recipe
runner (`compress.app.pipeline`) walks the table in order."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from compress import stages
from compress.app.flags import flag
from compress.app.recipe import Recipe
from compress.app.results import (UNPRUNED, Exported, ExportedFile, Finetuned, LatencyTableBuilt, Net, Nets, Searched,
                                  SupernetTrained, Timed, Timing, Transferred, Tuned, Unpruned)
from compress.app.run_context import RunContext
from compress.checkpoint import read_checkpoint, save_checkpoint
from compress.errors import CheckFailed
from compress.models.card import card_of
from compress.pruning.profile import count
from compress.settings import ExportSettings, PruneSettings, SearchSettings, TrainSettings
from compress.training import distributed
from compress.training.keep_best import kept_best
from compress.training.loop import STATE_FILE
from compress.units import parse_latency


@dataclass(frozen=True)
class Stage:
    name: str  # its folder in the run, and its line in the log
    result: type  # the typed result it returns (compress.app.results)
    inputs: Callable[[Recipe], dict]  # the recipe settings its result depends on (its fingerprint)
    upstream: Callable[[Recipe], list[str]]  # the stages whose results it reads
    run: Callable[[RunContext, Path], object]
    applies: Callable[[Recipe], bool] = lambda recipe: True
    everywhere: bool = False  # runs on every torchrun rank (training, search); else on rank 0


def _start(r: Recipe) -> list[str]:
    """The stages the compressed model comes from."""
    return ["transfer"] if r.transfer is not None else []


def _direct(r: Recipe) -> bool:
    return r.supernet.method == "none"


def _has_lut(r: Recipe) -> bool:
    return not _direct(r) and any(t.latency for t in r.targets())


# ---- transfer, prune ------------------------------------------------------------------------
def transfer(ctx: RunContext, folder: Path) -> Transferred | None:
    r = ctx.recipe
    # `chansearch train` reads its flags against TrainSettings' defaults, not the transfer's
    ctx.command("train", [r.model.name], [r.model, r.data, TrainSettings(**r.transfer.model_dump())],
                ["--data", r.data.spec, "-o", folder])
    torch.manual_seed(r.transfer.seed)
    done = stages.train(ctx.given_model(), r.data, r.transfer, folder, resume=(folder / STATE_FILE).exists(),
                        quiet=ctx.quiet, provenance={"created_by": "chansearch run (transfer)", "parent": r.model.name,
                                                     "pretrained": r.model.pretrained})
    return Transferred(str(done.checkpoint)) if distributed.is_main() else None


def prune(ctx: RunContext, folder: Path) -> Nets:
    r, p = ctx.recipe, ctx.recipe.prune
    nets = {}
    name, model_flags = ctx.source()
    for target in p.targets:
        path = folder / f"{target.tag()}.pt"
        budgets = {k: v for k, v in (("macs", target.macs), ("params", target.params), ("latency", target.latency))
                   if v is not None}
        if not path.exists():
            clock = [p.lut] if target.latency else []
            ctx.command("prune", [name], [*model_flags, PruneSettings(**p.model_dump(exclude={"lut"})), *clock],
                        [x for k, v in budgets.items() for x in (flag(k), v)] + ["--data", r.data.spec, "-o", path])
            stages.prune(ctx.model(), p, **budgets, clock=p.lut, output=path, data=r.data.spec,
                         provenance={"created_by": "chansearch run", "parent": name}, progress=not ctx.quiet)
        nets[target.tag()] = Net(str(path), " ".join(f"{k}<={v}" for k, v in budgets.items()),
                                 latency=read_checkpoint(path)["provenance"].get("latency"))
    # the unpruned model teaches: the transfer stage's checkpoint as it is, else a copy saved here
    teacher = Path(name) if r.transfer is not None else folder / "teacher.pt"
    original = ctx.model()
    if r.finetune.distill and not teacher.exists():
        save_checkpoint(teacher, original, provenance={"created_by": "chansearch run (unpruned model)"})
    macs, params = count(original, card_of(original).input_size)
    return Nets(nets, str(teacher) if r.finetune.distill else None, Unpruned(macs, params, ctx.test(original)))


# ---- supernet, latency table, search, extract -----------------------------------------------
def supernet(ctx: RunContext, folder: Path) -> SupernetTrained | None:
    r = ctx.recipe
    name, model_flags = ctx.source()
    ctx.command("supernet", [name], [*model_flags, r.data, r.supernet, ctx.scoring()],
                ["--data", r.data.spec, "-o", folder])
    torch.manual_seed(r.supernet.seed)
    done = stages.train_supernet(ctx.model(), r.data, r.supernet, folder, scoring=ctx.scoring(),
                                 pretrained=r.trained_before(), resume=(folder / STATE_FILE).exists(),
                                 quiet=ctx.quiet, ranking=r.prune)
    return SupernetTrained(str(done.checkpoint), done.summary) if distributed.is_main() else None


def latency_table(ctx: RunContext, folder: Path) -> LatencyTableBuilt:
    lut, run = ctx.recipe.search.lut, ctx.dir / "supernet"
    ctx.command("lut", [run], [lut], ["-o", folder / "lut.json"])
    model, space = stages.lut_model_space(run)
    stages.latency_table(model, space, lut, folder / "lut.json", progress=not ctx.quiet)
    return LatencyTableBuilt(str(folder / "lut.json"))


def search(ctx: RunContext, folder: Path) -> Searched | None:
    s = ctx.recipe.search
    lut = ctx.dir / "lut" / "lut.json" if _has_lut(ctx.recipe) else None
    lists = {key: ",".join("-" if getattr(t, key) is None else str(getattr(t, key)) for t in s.targets)
             for key in ("macs", "params", "latency") if any(getattr(t, key) is not None for t in s.targets)}
    budget_flags = [x for key, value in lists.items() for x in (flag(key), value)]
    ctx.command("search", [ctx.dir / "supernet"], [SearchSettings(**s.model_dump(exclude={"lut"}))],
                budget_flags + (["--lut", lut] if lut else []) + ["-o", folder])
    done = stages.search(ctx.dir / "supernet", s, out=folder, lut=lut, quiet=ctx.quiet)
    if not distributed.is_main():
        return None
    return Searched(str(folder / "search.json"), str(folder / "search.png"), done.result["targets"],
                    done.result["full"])


def extract(ctx: RunContext, folder: Path) -> Nets:
    r, found = ctx.recipe, ctx.results["search"]
    # extract.weights teacher: the searched widths are cut from the model the supernet was
    # trained from, which then teaches their fine-tune; else the supernet's full config teaches
    unpruned = _unpruned_checkpoint(ctx, folder) if r.extract.weights == "teacher" else None
    teacher_flags = ["--teacher", unpruned] if unpruned else []
    source = None  # the unpruned model, loaded once for every target that needs it
    nets = {}
    for target, entry in zip(r.search.targets, found.targets):
        path = folder / f"{target.tag()}.pt"
        if not path.exists():
            ctx.command("extract", [ctx.dir / "supernet"], [],
                        ["--search", ctx.dir / "search", "--budget", entry["label"], *teacher_flags, "-o", path])
            if unpruned and source is None:
                source = ctx.load(unpruned)
            stages.extract(ctx.dir / "supernet", path, target=entry["label"], search_dir=ctx.dir / "search",
                           teacher=source, prune_settings=r.prune)
        nets[target.tag()] = Net(str(path), entry["label"], entry["top1"])
    teacher = unpruned or folder / "teacher.pt"
    if r.finetune.distill and not teacher.exists():
        stages.supernet_teacher(ctx.dir / "supernet", ctx.scoring(), teacher)
    return Nets(nets, str(teacher) if r.finetune.distill else None)


def _unpruned_checkpoint(ctx: RunContext, folder: Path) -> Path:
    """The model the supernet was trained from, as a checkpoint: the transfer stage's, or a copy
    of the recipe's pretrained model saved here."""
    if ctx.recipe.transfer is not None:
        return Path(ctx.results["transfer"].model)
    path = folder / "unpruned.pt"
    if not path.exists():
        save_checkpoint(path, ctx.given_model(), provenance={"created_by": "chansearch run (unpruned model)"})
    return path


# ---- fine-tune ------------------------------------------------------------------------------
def finetune(ctx: RunContext, folder: Path) -> Finetuned | None:
    r, f = ctx.recipe, ctx.recipe.finetune
    upstream: Nets = ctx.results["prune" if _direct(r) else "extract"]
    paths, kept = {}, {}
    command = "train" if f.from_scratch else "finetune"
    for tag, net in upstream.nets.items():
        run_dir = folder / f"{tag}_run"
        path = run_dir / "model.pt" if f.from_scratch else folder / f"{tag}.pt"
        if f.epochs == 0:
            path = Path(net.path)
        elif not path.exists():
            teacher = upstream.teacher if f.distill else None
            # from scratch, `chansearch train`'s settings (its lr unless the recipe sets one); else the
            # fine-tune's own, whose lr (when not set) is picked by the lr trial
            settings = (TrainSettings(**f.model_dump(exclude={"from_scratch", "distill", "lr_base", "lr_trial",
                                                              "block_steps", "block_images"}, exclude_none=True))
                        if f.from_scratch else f)
            where = ["--from-scratch", "-o", run_dir] if f.from_scratch else ["-o", path, "--run-dir", run_dir]
            # the command's flags are read against its own defaults: train's, or finetune's
            shown = settings if f.from_scratch else f.model_copy(update={"distill": True})
            ctx.command(command, [net.path], [r.data, shown],
                        ["--data", r.data.spec, *(["--teacher", teacher] if teacher else []), *where,
                         *ctx.trust_flag()])
            torch.manual_seed(f.seed)
            stages.train(ctx.load(net.path, from_scratch=f.from_scratch), r.data, settings, run_dir, output=path,
                         teacher=ctx.load(teacher) if teacher else None, resume=(run_dir / STATE_FILE).exists(),
                         quiet=ctx.quiet, provenance={"created_by": f"chansearch run ({command})", "parent": net.path,
                                                      "teacher": teacher, "from_scratch": f.from_scratch})
        paths[tag], kept[tag] = str(path), kept_best(run_dir)
    distributed.barrier()
    if not distributed.is_main():
        return None
    original = ctx.model()  # fidelity: how often the pruned net predicts what it did
    return Finetuned({tag: Tuned(paths[tag], ctx.test(net.path, original), ctx.test(paths[tag], original), kept[tag])
                      for tag, net in upstream.nets.items()})


# ---- export, latency ------------------------------------------------------------------------
def _variants(e: ExportSettings, fmt: str) -> list[tuple[str, ExportSettings]]:
    """The float file, and the quantized one beside it when the recipe asks (ONNX takes static
    int8 only)."""
    float_only = e.model_copy(update={"int8": False, "int8_io": False, "dynamic_range": False, "keep_float": 0})
    chosen = [(fmt, float_only.model_copy(update={"nhwc": e.nhwc and fmt == "tflite"}))]
    if fmt == "tflite" and e.quantize:
        chosen.append((f"tflite-{e.quantize}", e))
    elif fmt == "onnx" and e.quantize in ("int8", "int8_io"):
        chosen.append(("onnx-int8", float_only.model_copy(update={"int8": True})))
    return chosen


def export(ctx: RunContext, folder: Path) -> Exported:
    """Every target as a float file per format and the quantized file beside it; on the direct
    path the unpruned model's files too, for the latency speed-up."""
    e, spec = ctx.recipe.export, ctx.recipe.data.spec
    models: list[tuple[str, nn.Module, str, list]] = [
        (tag, ctx.load(net.path), net.path, []) for tag, net in ctx.results["finetune"].nets.items()]
    if "prune" in ctx.results:
        models.append((UNPRUNED, ctx.model(), *ctx.source()))
    files = []
    for tag, model, source, model_flags in models:
        for fmt in e.formats:
            for variant, settings in _variants(e, fmt):
                path = folder / f"{tag}{variant.removeprefix(fmt).replace('-', '_')}.{fmt}"
                ctx.command("export", [source], [*model_flags, settings.model_copy(update={"formats": [fmt]})],
                            ["--format", fmt, "--calib-data", spec, "-o", path,
                             *(ctx.trust_flag() if source.endswith(".pt") else [])])
                try:
                    report, ok, error = stages.export(model, fmt, path, settings, data=spec), True, None
                except CheckFailed as exc:
                    report, ok, error = exc.report or {"path": str(path)}, False, str(exc)
                kept = {k: report[k] for k in ("bytes", "float_bytes", "quantize", "parity", "keep_float") if k in report}
                files.append(ExportedFile(tag, variant, report.get("path", str(path)), ok, error=error, **kept))
    return Exported(files)


def latency(ctx: RunContext, folder: Path) -> Timed:
    """Time every exported file, in turns (`stages.latencies`), so that the report's ratios
    compare files timed on the same machine; a target's latency budget (a share: of the
    unpruned file of the same kind, timed with it) or else the latency section's `budget_ms`
    is checked."""
    lat = ctx.recipe.latency
    suffix = {"tflite": ".tflite", "onnxruntime": ".onnx"}.get(lat.backend)
    files = [f for f in ctx.results["export"].files
             if Path(f.path).exists() and not (suffix and Path(f.path).suffix != suffix)]  # a runtime times its own
    times = stages.latencies([f.path for f in files], lat) if files else []
    unpruned = {f.variant: t["median_ms"] for f, t in zip(files, times) if f.tag == UNPRUNED}
    targets, timings = {t.tag(): t for t in ctx.recipe.targets()}, []
    for item, measured in zip(files, times):
        target = targets.get(item.tag)
        budget = lat.budget_ms
        if target is not None and target.latency is not None and (item.variant in unpruned or
                                                                  target.latency.endswith("ms")):
            budget = parse_latency(target.latency, unpruned.get(item.variant))
        ctx.command("latency", [item.path], [lat.model_copy(update={"budget_ms": budget})])
        median = measured.pop("median_ms")
        timings.append(Timing(item.tag, item.variant, item.path, median, budget, budget is None or median <= budget,
                              measured.pop("backend"), measured.pop("threads"), measured))
    return Timed(timings)


STAGES = [
    Stage("transfer", Transferred, lambda r: {"model": r.model, "data": r.data, "transfer": r.transfer},
          lambda r: [], transfer, applies=lambda r: r.transfer is not None, everywhere=True),
    Stage("prune", Nets, lambda r: {"model": r.model, "prune": r.prune}, _start, prune, applies=_direct),
    # a pretrained supernet's channels are ordered as the prune section ranks them
    Stage("supernet", SupernetTrained, lambda r: {"model": r.model, "data": r.data, "supernet": r.supernet,
                                                  "seed": r.seed, "ranking": r.prune.model_dump(exclude={"targets", "lut"})},
          _start, supernet, applies=lambda r: not _direct(r), everywhere=True),
    Stage("lut", LatencyTableBuilt, lambda r: {"lut": r.search.lut}, lambda r: ["supernet"], latency_table,
          applies=_has_lut),
    Stage("search", Searched, lambda r: {"search": r.search.model_dump(exclude={"lut"})},
          lambda r: ["supernet", "lut"] if _has_lut(r) else ["supernet"], search, applies=lambda r: not _direct(r),
          everywhere=True),
    Stage("extract", Nets, lambda r: {"extract": r.extract, "prune": r.prune.model_dump(exclude={"targets"})},
          lambda r: ["search"], extract, applies=lambda r: not _direct(r)),
    Stage("finetune", Finetuned, lambda r: {"finetune": r.finetune, "data": r.data},
          lambda r: ["prune" if _direct(r) else "extract"], finetune, everywhere=True),
    Stage("export", Exported, lambda r: {"export": r.export, "data": r.data.spec}, lambda r: ["finetune"], export),
    Stage("latency", Timed, lambda r: {"latency": r.latency}, lambda r: ["export"], latency),
]
