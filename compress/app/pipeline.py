"""`chansearch run recipe.yaml`: the recipe's stages in order, each in its own folder of the
run (`runs/<name>/<stage>/`), resumable.

A stage is skipped when it finished with the same inputs (its settings plus the
fingerprints of the stages it reads); a stage whose inputs changed is moved aside to
`<stage>.previous/` and re-run, and so is everything after it. An interrupted stage
continues from its own checkpoints (training `last.pt`, the search's state file, the
per-target files it already wrote). Each stage calls its function of the stage API
(`compress.stages`); training and search run on every rank under torchrun, the other
stages on rank 0. The report lists the `chansearch` command equivalent to each stage,
derived from the same settings.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from compress import stages

from compress.training import distributed
from compress.models.card import card_of
from compress.checkpoint import load_target, save_checkpoint
from compress.models.sources import is_code
from compress.data.specs import DataSpec, check_task, eval_set, loader, random_subset
from compress.errors import CheckFailed, CompressError
from compress.training.evaluate import evaluate
from compress.files import RunLock, atomic_write_json, atomic_write_text
from compress.app.flags import command_line, flag
from compress.pruning.profile import count
from compress.app.recipe import Recipe, dump, load_recipe
from compress.app.report import UNPRUNED, write_report
from compress.settings import ExportSettings, HeldOutScoring, SearchSettings, TrainSettings
from compress.training.keep_best import kept_best
from compress.training.loop import STATE_FILE

MARKER = "stage.json"


class Pipeline:
    def __init__(self, recipe: Recipe, quiet: bool = False):
        self.recipe = recipe
        self.dir = recipe.run_dir()
        self.quiet = quiet
        self.records: dict[str, dict] = {}
        self.commands: list[str] = []  # the equivalent chansearch commands, for the report

    # ---- stage bookkeeping -------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if distributed.is_main():
            print(f"[{self.recipe.name}] {msg}", flush=True)

    def stage(self, name: str, settings: dict, upstream: list[str], fn: Callable[[Path], dict],
              everywhere: bool = False) -> dict:
        """Run `fn(stage_dir)` -> outputs, unless it already finished with these inputs."""
        fingerprint = hashlib.sha1(json.dumps(
            {"settings": settings, "upstream": [self.records[u]["fingerprint"] for u in upstream]},
            sort_keys=True, default=str).encode()).hexdigest()[:16]
        folder = self.dir / name
        marker = folder / MARKER
        if marker.exists():
            record = json.loads(marker.read_text())
            if record["fingerprint"] == fingerprint:
                self.log(f"{name}: done earlier, skipped")
                self.records[name] = record
                self.commands += record.get("commands", [])
                return record["outputs"]
        started = folder / "started.json"
        if distributed.is_main() and folder.exists():
            before = json.loads(started.read_text())["fingerprint"] if started.exists() else None
            if before != fingerprint:  # made with other inputs: keep it aside, never reuse it
                aside = folder.with_name(f"{name}.previous")
                shutil.rmtree(aside, ignore_errors=True)
                folder.rename(aside)
                self.log(f"{name}: inputs changed, re-running (the old results are in {aside})")
            else:
                self.log(f"{name}: resuming an interrupted stage")
        distributed.barrier()
        if distributed.is_main():
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_json(started, {"fingerprint": fingerprint})
        distributed.barrier()
        self.log(f"{name}: running")
        began = time.time()
        first_command = len(self.commands)
        outputs = fn(folder) if everywhere or distributed.is_main() else None
        if distributed.is_main():
            record = {"fingerprint": fingerprint, "outputs": outputs, "seconds": round(time.time() - began, 1),
                      "commands": self.commands[first_command:]}
            atomic_write_json(marker, record)
        distributed.barrier()
        self.records[name] = json.loads(marker.read_text())
        return self.records[name]["outputs"]

    def command(self, *args, **kwargs) -> None:
        """Record the `chansearch` command equivalent to what a stage is about to do."""
        self.commands.append(command_line(*args, **kwargs))

    # ---- the pipeline ------------------------------------------------------------------------
    def run(self) -> int:
        """Run (or resume) every stage, holding the run folder for the whole run."""
        distributed.init()
        if not distributed.is_main():
            return self._stages()
        with RunLock(self.dir):
            return self._stages()

    def _stages(self) -> int:
        r = self.recipe
        if distributed.is_main():
            atomic_write_text(self.dir / "recipe.yaml", dump(r))
        targets = r.targets()
        start = []  # the stages the compressed model comes from
        if r.transfer is not None:
            self.stage("transfer", {"model": r.model, "data": r.data, "transfer": r.transfer}, [], self._transfer,
                       everywhere=True)
            start = ["transfer"]
        if r.supernet.method == "none":
            nets = self.stage("prune", {"model": r.model, "prune": r.prune}, start, self._prune)
            upstream = ["prune"]
        else:
            # a pretrained supernet's channels are ordered as the prune section ranks them
            self.stage("supernet", {"model": r.model, "data": r.data, "supernet": r.supernet, "seed": r.seed,
                                    "ranking": r.prune.model_dump(exclude={"targets"})}, start,
                       self._supernet, everywhere=True)
            search_up = ["supernet"]
            if any(t.latency_ms for t in targets):
                self.stage("lut", {"lut": r.search.lut}, ["supernet"], self._lut)
                search_up.append("lut")
            self.stage("search", {"search": r.search.model_dump(exclude={"lut"})}, search_up, self._search,
                       everywhere=True)
            nets = self.stage("extract", {"extract": r.extract, "prune": r.prune.model_dump(exclude={"targets"})},
                              ["search"], self._extract)
            upstream = ["extract"]
        tuned = self.stage("finetune", {"finetune": r.finetune, "data": r.data}, upstream, self._finetune,
                           everywhere=True)
        exported = self.stage("export", {"export": r.export, "data": r.data.spec}, ["finetune"], self._export)
        timed = self.stage("latency", {"latency": r.latency}, ["export"], self._latency)
        failures = []
        if distributed.is_main():
            failures = write_report(self, nets, tuned, exported, timed)
        distributed.barrier()
        if failures:
            raise CheckFailed(f"{len(failures)} check(s) failed: {'; '.join(failures)}. Details in "
                              f"{self.dir / 'report.md'}.")
        return 0

    def _model(self):
        """The model to compress: the recipe's, or the transfer stage's when there is one."""
        if self.recipe.transfer is not None:
            return self._load(self.records["transfer"]["outputs"]["model"])
        return self._given_model()

    def _load(self, path: str, **kwargs):
        """A checkpoint of this run; one made from the recipe's own factory (model.name:
        file.py:factory) is rebuilt with it, which the recipe asked for by naming it."""
        return load_target(path, trust_code=_trusts_code(self.recipe), **kwargs)

    def _trust_flag(self) -> list:
        return ["--trust-code"] if _trusts_code(self.recipe) else []

    def _source(self) -> tuple[str, list]:
        """How the equivalent commands name the model to compress: its name and model flags."""
        if self.recipe.transfer is not None:
            return self.records["transfer"]["outputs"]["model"], []
        return self.recipe.model.name, [self.recipe.model]

    def _given_model(self):
        m = self.recipe.model
        return load_target(m.name, m.num_classes, m.width_mult, m.pretrained, m.input_size)

    def _transfer(self, folder: Path) -> dict:
        r = self.recipe
        resume = (folder / STATE_FILE).exists()
        # `chansearch train` reads its flags against TrainSettings' defaults, not the transfer's
        self.command("train", [r.model.name], [r.model, r.data, TrainSettings(**r.transfer.model_dump())],
                     ["--data", r.data.spec, "--out", folder])
        torch.manual_seed(r.transfer.seed)
        done = stages.train(self._given_model(), r.data, r.transfer, folder, resume=resume, quiet=self.quiet,
                            provenance={"created_by": "chansearch run (transfer)", "parent": r.model.name,
                                        "pretrained": r.model.pretrained})
        return {"model": str(done.checkpoint)} if distributed.is_main() else {}

    def _supernet(self, folder: Path) -> dict:
        r = self.recipe
        resume = (folder / STATE_FILE).exists()
        name, model_flags = self._source()
        self.command("supernet", [name], [*model_flags, r.data, r.supernet, _scoring(r.search)],
                     ["--data", r.data.spec, "--out", folder])
        torch.manual_seed(r.supernet.seed)
        trained_before = r.trained_before()
        done = stages.train_supernet(self._model(), r.data, r.supernet, folder, scoring=_scoring(r.search),
                                     pretrained=trained_before, resume=resume, quiet=self.quiet, ranking=r.prune)
        return {"supernet": str(done.checkpoint), "summary": done.summary} if distributed.is_main() else {}

    def _lut(self, folder: Path) -> dict:
        lut = self.recipe.search.lut
        run = self.dir / "supernet"
        self.command("lut", [run], [lut], ["-o", folder / "lut.json"])
        model, space = stages.lut_model_space(run)
        stages.latency_table(model, space, lut, folder / "lut.json", progress=not self.quiet)
        return {"lut": str(folder / "lut.json")}

    def _search(self, folder: Path) -> dict:
        s = self.recipe.search
        lut = self.dir / "lut" / "lut.json" if any(t.latency_ms for t in s.targets) else None
        lists = {key: ",".join("-" if getattr(t, key) is None else str(getattr(t, key)) for t in s.targets)
                 for key in ("macs", "params", "latency_ms") if any(getattr(t, key) is not None for t in s.targets)}
        budget_flags = [x for key, value in lists.items() for x in (flag(key), value)]
        self.command("search", [self.dir / "supernet"], [SearchSettings(**s.model_dump(exclude={"lut"}))],
                     budget_flags + (["--lut", lut] if lut else []) + ["--out", folder])
        done = stages.search(self.dir / "supernet", s, out=folder, lut=lut, quiet=self.quiet)
        if not distributed.is_main():
            return {}
        return {"result": str(folder / "search.json"), "plot": str(folder / "search.png"),
                "targets": done.result["targets"], "full": done.result["full"]}

    def _extract(self, folder: Path) -> dict:
        r, search = self.recipe, self.records["search"]["outputs"]
        # extract.weights teacher: the searched widths are cut from the model the supernet was
        # trained from, which then teaches their fine-tune; else the supernet's full config teaches
        unpruned = self._unpruned(folder) if r.extract.weights == "teacher" else None
        teacher_flags = ["--teacher", unpruned] if unpruned else []
        source = None  # the unpruned model, loaded once for every target that needs it
        nets = {}
        for target, entry in zip(r.search.targets, search["targets"]):
            path = folder / f"{target.tag()}.pt"
            if not path.exists():
                self.command("extract", [self.dir / "supernet"], [],
                             ["--search", self.dir / "search", "--target", entry["label"], *teacher_flags, "-o", path])
                if unpruned and source is None:
                    source = self._load(str(unpruned))
                stages.extract(self.dir / "supernet", path, target=entry["label"], search_dir=self.dir / "search",
                               teacher=source, prune_settings=r.prune)
            nets[target.tag()] = {"path": str(path), "label": entry["label"], "heldout_top1": entry["top1"]}
        teacher = unpruned or folder / "teacher.pt"
        if r.finetune.distill and not teacher.exists():
            stages.supernet_teacher(self.dir / "supernet", _scoring(r.search), teacher)
        return {"nets": nets, "teacher": str(teacher) if r.finetune.distill else None}

    def _unpruned(self, folder: Path) -> Path:
        """The model the supernet was trained from, as a checkpoint: the transfer stage's, or a copy
        of the recipe's pretrained model saved here."""
        if self.recipe.transfer is not None:
            return Path(self.records["transfer"]["outputs"]["model"])
        path = folder / "unpruned.pt"
        if not path.exists():
            save_checkpoint(path, self._given_model(), provenance={"created_by": "chansearch run (unpruned model)"})
        return path

    def _prune(self, folder: Path) -> dict:
        r, p = self.recipe, self.recipe.prune
        nets = {}
        name, model_flags = self._source()
        for target in p.targets:
            path = folder / f"{target.tag()}.pt"
            if not path.exists():
                self.command("prune", [name], [*model_flags, p],
                             ["--macs", target.macs, "--data", r.data.spec, "-o", path])
                stages.prune(self._model(), p, macs=target.macs, output=path, data=r.data.spec,
                             provenance={"created_by": "chansearch run", "parent": name})
            nets[target.tag()] = {"path": str(path), "label": f"macs<={target.macs}", "heldout_top1": None}
        # the unpruned model teaches: the transfer stage's checkpoint as it is, else a copy saved here
        teacher = Path(name) if r.transfer is not None else folder / "teacher.pt"
        original = self._model()
        if r.finetune.distill and not teacher.exists():
            save_checkpoint(teacher, original, provenance={"created_by": "chansearch run (unpruned model)"})
        macs, params = count(original, card_of(original).input_size)
        unpruned = {"macs": macs, "params": params, "test": _test_model(original, r)}
        return {"nets": nets, "teacher": str(teacher) if r.finetune.distill else None, "unpruned": unpruned}

    def _finetune(self, folder: Path) -> dict:
        r, f = self.recipe, self.recipe.finetune
        upstream = self.records["prune" if r.supernet.method == "none" else "extract"]["outputs"]
        out = {}
        command = "train" if f.from_scratch else "finetune"
        for tag, net in upstream["nets"].items():
            run_dir = folder / f"{tag}_run"
            path = run_dir / "model.pt" if f.from_scratch else folder / f"{tag}.pt"
            if f.epochs == 0:
                path = Path(net["path"])
            elif not path.exists():
                teacher = upstream["teacher"] if f.distill else None
                # what the training loop takes; from_scratch and distill decided the model and the teacher
                settings = TrainSettings(**f.model_dump(exclude={"from_scratch", "distill"}))
                where = ["--from-scratch", "--out", run_dir] if f.from_scratch else ["-o", path, "--run-dir", run_dir]
                # the command's flags are read against its own defaults: train's, or finetune's
                shown = settings if f.from_scratch else f.model_copy(update={"distill": True})
                self.command(command, [net["path"]], [r.data, shown],
                             ["--data", r.data.spec, *(["--teacher", teacher] if teacher else []), *where,
                              *self._trust_flag()])
                torch.manual_seed(f.seed)
                model = self._load(net["path"], from_scratch=f.from_scratch)
                stages.train(model, r.data, settings, run_dir, output=path,
                             teacher=self._load(teacher) if teacher else None,
                             resume=(run_dir / STATE_FILE).exists(), quiet=self.quiet,
                             provenance={"created_by": f"chansearch run ({command})", "parent": net["path"],
                                         "teacher": teacher, "from_scratch": f.from_scratch})
            out[tag] = {"path": str(path)}
            kept = kept_best(run_dir)
            if kept:
                out[tag]["kept_best"] = kept
        distributed.barrier()
        if distributed.is_main():
            original = self._model()  # fidelity: how often the pruned net predicts what it did
            for tag, net in upstream["nets"].items():
                out[tag]["test_before"] = _test(net["path"], self.recipe, original)
                out[tag]["test_after"] = _test(out[tag]["path"], self.recipe, original)
        return out

    def _export(self, folder: Path) -> dict:
        """Every target as a float file per format and, when the recipe quantizes, the
        quantized file beside it (ONNX takes static int8 only), so the report compares them;
        on the direct path the unpruned model's files too, for the latency speed-up."""
        e, spec = self.recipe.export, self.recipe.data.spec
        float_only = e.model_copy(update={"int8": False, "int8_io": False, "dynamic_range": False,
                                          "keep_float": 0})
        out = {}

        def export(model: nn.Module, source: str, model_flags: list, key: str, fmt: str, settings, path: Path) -> None:
            self.command("export", [source], [*model_flags, settings.model_copy(update={"formats": [fmt]})],
                         ["--format", fmt, "--calib-data", spec, "-o", path, *(self._trust_flag() if source.endswith(
                             ".pt") else [])])
            try:
                out[key] = _exported(stages.export(model, fmt, path, settings, data=spec), ok=True)
            except CheckFailed as exc:
                out[key] = {**_exported(exc.report or {"path": str(path)}, ok=False), "error": str(exc)}

        def variants(fmt: str) -> list[tuple[str, ExportSettings]]:
            """The float file, and the quantized one beside it when the recipe asks."""
            chosen = [(fmt, float_only.model_copy(update={"nhwc": e.nhwc and fmt == "tflite"}))]
            if fmt == "tflite" and e.quantize:
                chosen.append((f"tflite-{e.quantize}", e))
            elif fmt == "onnx" and e.quantize in ("int8", "int8_io"):
                chosen.append(("onnx-int8", float_only.model_copy(update={"int8": True})))
            return chosen

        def export_all(model: nn.Module, source: str, model_flags: list, tag: str) -> None:
            for fmt in e.formats:
                for name, settings in variants(fmt):
                    path = folder / f"{tag}{name.removeprefix(fmt).replace('-', '_')}.{fmt}"
                    export(model, source, model_flags, f"{tag}/{name}", fmt, settings, path)

        for tag, net in self.records["finetune"]["outputs"].items():
            export_all(self._load(net["path"]), net["path"], [], tag)
        if "prune" in self.records:
            export_all(self._model(), *self._source(), UNPRUNED)
        return out

    def _latency(self, folder: Path) -> dict:
        lat = self.recipe.latency
        budgets = {t.tag(): t.latency_ms or lat.budget_ms for t in self.recipe.targets()}
        out = {}
        suffix = {"tflite": ".tflite", "onnxruntime": ".onnx"}.get(lat.backend)
        for key, item in self.records["export"]["outputs"].items():
            if not Path(item["path"]).exists() or suffix and Path(item["path"]).suffix != suffix:
                continue  # a runtime times its own files; `auto` times each on its own
            settings = lat.model_copy(update={"budget_ms": budgets.get(key.split("/")[0])})
            self.command("latency", [item["path"]], [settings])
            result = stages.latency(item["path"], settings)
            result.update(budget_ms=settings.budget_ms, ok=result.get("within_budget", True))
            out[key] = result
        return out


def _exported(report: dict, ok: bool) -> dict:
    """What the report and the latency stage need of an export report."""
    keep = ("path", "bytes", "float_bytes", "quantize", "parity", "keep_float")
    return {**{k: report[k] for k in keep if k in report}, "ok": ok}


def _scoring(search: SearchSettings) -> HeldOutScoring:
    """The search's held-out scoring, which the supernet's summary and the teacher use too."""
    return HeldOutScoring(**search.model_dump(include=set(HeldOutScoring.model_fields)))


def _trusts_code(recipe: Recipe) -> bool:
    """The run rebuilds its checkpoints with the recipe's own factory when it names one."""
    return recipe.model.trust_code or is_code(recipe.model.name)


def _test(path: str, recipe: Recipe, teacher: nn.Module | None = None) -> dict:
    """The task's metric on the data's evaluation split (capped by finetune.val_images when set),
    with the fidelity to `teacher`'s predictions when given."""
    return _test_model(load_target(path, trust_code=_trusts_code(recipe)), recipe, teacher)


def _test_model(model: nn.Module, recipe: Recipe, teacher: nn.Module | None = None) -> dict:
    card = model.card
    check_task(recipe.data.spec, card.task)
    ds = eval_set(recipe.data.spec, card.input_size, card.mean, card.std, card.num_classes)
    ds = random_subset(ds, recipe.finetune.val_images, recipe.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return evaluate(model.to(device), loader(ds, 64, recipe.data.workers), device, distributed_sum=False,
                    teacher=teacher.to(device) if teacher is not None else None)


def run_recipe(path: str, overrides: list[str], quiet: bool = False) -> int:
    recipe = load_recipe(path, overrides)
    _check_inputs(recipe)
    return Pipeline(recipe, quiet=quiet).run()


def _check_inputs(recipe: Recipe) -> None:
    """Fail before any work on inputs that do not exist."""
    spec = DataSpec.parse(recipe.data.spec)
    if spec.kind not in ("synthetic", "shapes", "shapeboxes") and not Path(spec.location).exists():
        raise CompressError(f"data.spec: '{spec.location}' does not exist (from {recipe.data.spec}); fix the path "
                            "in the recipe or override it: data.spec=cifar10:/path/to/cifar10.")
    name = recipe.model.name
    if name.endswith((".pt", ".pth")) and not Path(name).is_file():
        raise CompressError(f"model.name: checkpoint '{name}' does not exist.")
    if recipe.model.pretrained not in (None, "torchvision", "timm") and not Path(recipe.model.pretrained).is_file():
        raise CompressError(f"model.pretrained: '{recipe.model.pretrained}' is neither 'torchvision', 'timm' nor an "
                            "existing file.")
