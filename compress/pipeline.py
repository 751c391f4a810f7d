"""`chansearch run recipe.yaml`: the recipe's stages in order, each in its own folder of the
run (`runs/<name>/<stage>/`), resumable.

A stage is skipped when it finished with the same inputs (its settings plus the
fingerprints of the stages it reads); a stage whose inputs changed is moved aside to
`<stage>.previous/` and re-run, and so is everything after it. An interrupted stage
continues from its own checkpoints (training `last.pt`, the search's state file, the
per-target files it already wrote). Training and search run as the `chansearch` commands
do, so under torchrun they are distributed; the other stages run on rank 0.
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from compress import distributed
from compress.errors import CheckFailed, CompressError
from compress.recipe import Recipe, dump

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
            started.write_text(json.dumps({"fingerprint": fingerprint}))
        distributed.barrier()
        self.log(f"{name}: running")
        began = time.time()
        first_command = len(self.commands)
        outputs = fn(folder) if everywhere or distributed.is_main() else None
        if distributed.is_main():
            record = {"fingerprint": fingerprint, "outputs": outputs, "seconds": round(time.time() - began, 1),
                      "commands": self.commands[first_command:]}
            tmp = folder / f".{MARKER}.tmp"
            tmp.write_text(json.dumps(record, indent=1, default=str))
            os.replace(tmp, marker)
        distributed.barrier()
        self.records[name] = json.loads(marker.read_text())
        return self.records[name]["outputs"]

    def chansearch(self, argv: list) -> None:
        """Run one `chansearch` command in this process (errors propagate as they are)."""
        from compress.cli import build_parser
        argv = [str(a) for a in argv]
        self.commands.append("chansearch " + shlex.join(argv))
        args = build_parser().parse_args(argv)
        args.func(args)

    # ---- the pipeline ------------------------------------------------------------------------
    def run(self) -> int:
        r = self.recipe
        distributed.init()
        if distributed.is_main():
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / "recipe.yaml").write_text(dump(r))
        targets = r.targets()
        if r.supernet.method == "none":
            nets = self.stage("prune", {"model": r.model, "prune": r.prune}, [], self._prune)
            upstream = ["prune"]
        else:
            self.stage("supernet", {"model": r.model, "data": r.data, "supernet": r.supernet, "seed": r.seed}, [],
                       self._supernet, everywhere=True)
            search_up = ["supernet"]
            if any(t.latency_ms for t in targets):
                self.stage("lut", {"lut": r.search.lut}, ["supernet"], self._lut)
                search_up.append("lut")
            self.stage("search", {"search": r.search.model_dump(exclude={"lut"})}, search_up, self._search,
                       everywhere=True)
            nets = self.stage("extract", {}, ["search"], self._extract)
            upstream = ["extract"]
        tuned = self.stage("finetune", {"finetune": r.finetune, "data": r.data}, upstream, self._finetune,
                           everywhere=True)
        exported = self.stage("export", {"export": r.export, "data": r.data.spec}, ["finetune"], self._export)
        timed = self.stage("latency", {"latency": r.latency}, ["export"], self._latency)
        failures = []
        if distributed.is_main():
            from compress.report import write_report
            failures = write_report(self, nets, tuned, exported, timed)
        distributed.barrier()
        if failures:
            raise CheckFailed(f"{len(failures)} check(s) failed: {'; '.join(failures)}. Details in "
                              f"{self.dir / 'report.md'}.")
        return 0

    def _model_flags(self) -> list:
        m = self.recipe.model
        flags = []
        for flag, value in (("--pretrained", m.pretrained), ("--num-classes", m.num_classes),
                            ("--input-size", m.input_size)):
            if value is not None:
                flags += [flag, value]
        return flags + (["--width-mult", m.width_mult] if m.width_mult != 1.0 else [])

    def _training_flags(self, t) -> list:
        d = self.recipe.data
        flags = ["--data", d.spec, "--epochs", t.epochs, "--lr", t.lr, "--weight-decay", t.weight_decay,
                 "--warmup-epochs", t.warmup_epochs, "--label-smoothing", t.label_smoothing,
                 "--steps-per-epoch", t.steps_per_epoch, "--val-images", t.val_images, "--batch-size", d.batch_size,
                 "--workers", d.workers, "--seed", self.recipe.seed, "--amp", t.amp]
        return flags + (["--channels-last"] if t.channels_last else []) + (["--quiet"] if self.quiet else [])

    def _supernet(self, folder: Path) -> dict:
        r, s = self.recipe, self.recipe.supernet
        if (folder / "last.pt").exists():
            self.chansearch(["supernet", "--resume", folder] + (["--quiet"] if self.quiet else []))
        else:
            self.chansearch(["supernet", r.model.name, *self._model_flags(), "--method", s.method,
                             "--min-width", s.min_width, "--divisor", s.divisor, "--num-random", s.num_random,
                             *(["--uniform"] if s.uniform else []), *([] if s.distill else ["--no-distill"]),
                             *([] if s.reorder else ["--no-reorder"]), "--hidden", s.hidden,
                             "--holdout", r.data.holdout, "--recal-images", r.search.recal_images,
                             "--eval-images", r.search.eval_images, *self._training_flags(s), "--out", folder])
        distributed.barrier()  # rank 0 writes the files read below
        if not distributed.is_main():
            return {}
        return {"supernet": str(folder / "supernet.pt"),
                "summary": json.loads((folder / "supernet_eval.json").read_text())}

    def _lut(self, folder: Path) -> dict:
        lut = self.recipe.search.lut
        self.chansearch(["lut", self.dir / "supernet", "--backend", lut.backend, "--threads", lut.threads,
                         "--grid", lut.grid, "--anchors", lut.anchors, "-o", folder / "lut.json",
                         *(["--quiet"] if self.quiet else [])])
        return {"lut": str(folder / "lut.json")}

    def _search(self, folder: Path) -> dict:
        s = self.recipe.search
        lists = {key: ",".join("-" if getattr(t, key) is None else str(getattr(t, key)) for t in s.targets)
                 for key in ("macs", "params", "latency_ms")}
        budget_flags = []
        for key, value in lists.items():
            if any(getattr(t, key) is not None for t in s.targets):
                budget_flags += [f"--{key.replace('_', '-')}", value]
        if lists["latency_ms"] and any(t.latency_ms for t in s.targets):
            budget_flags += ["--lut", self.dir / "lut" / "lut.json"]
        strategy = (["--greedy-step", s.greedy_step] if s.method == "greedy" else
                    ["--samples", s.samples] if s.method == "random" else
                    ["--population", s.population, "--parents", s.parents, "--mutations", s.mutations,
                     "--crossovers", s.crossovers, "--iterations", s.iterations, "--mutation-prob", s.mutation_prob])
        self.chansearch(["search", self.dir / "supernet", "--method", s.method, *budget_flags,
                         "--recal-images", s.recal_images, "--eval-images", s.eval_images, *strategy,
                         "--seed", self.recipe.seed, "--out", folder, *(["--quiet"] if self.quiet else [])])
        distributed.barrier()
        if not distributed.is_main():
            return {}
        result = json.loads((folder / "search.json").read_text())
        return {"result": str(folder / "search.json"), "plot": str(folder / "search.png"),
                "targets": result["targets"], "full": result["full"]}

    def _extract(self, folder: Path) -> dict:
        from compress.checkpoint import save_checkpoint
        from compress.cli import _held_out
        from compress.supernet import load_supernet, recalibrate_bn
        search = self.records["search"]["outputs"]
        nets = {}
        for target, entry in zip(self.recipe.search.targets, search["targets"]):
            path = folder / f"{target.tag()}.pt"
            if not path.exists():
                self.chansearch(["extract", self.dir / "supernet", "--search", self.dir / "search",
                                 "--target", entry["label"], "-o", path])
            nets[target.tag()] = {"path": str(path), "label": entry["label"], "heldout_top1": entry["top1"]}
        teacher = folder / "teacher.pt"
        if self.recipe.finetune.distill and not teacher.exists():  # the supernet's full config teaches
            supernet, record = load_supernet(self.dir / "supernet" / "supernet.pt")
            held = _held_out(supernet, record["holdout"], self.recipe.search.recal_images, 1)
            recalibrate_bn(supernet, supernet.space.max(), held.batches("recal"))
            save_checkpoint(teacher, supernet.extract(supernet.space.max()),
                            provenance={"created_by": "chansearch run (supernet full config)"})
        return {"nets": nets, "teacher": str(teacher) if self.recipe.finetune.distill else None}

    def _prune(self, folder: Path) -> dict:
        from compress.checkpoint import save_checkpoint
        from compress.models import load_target
        r, p = self.recipe, self.recipe.prune
        nets = {}
        for target in p.targets:
            path = folder / f"{target.tag()}.pt"
            if not path.exists():
                self.chansearch(["prune", r.model.name, *self._model_flags(), "--macs", target.macs, "--importance",
                                 p.importance, "--strategy", p.strategy, "--divisor", p.divisor, "-o", path])
            nets[target.tag()] = {"path": str(path), "label": f"macs<={target.macs}", "heldout_top1": None}
        teacher = folder / "teacher.pt"
        if r.finetune.distill and not teacher.exists():  # the unpruned model teaches
            m = r.model
            save_checkpoint(teacher, load_target(m.name, m.num_classes, m.width_mult, m.pretrained, m.input_size),
                            provenance={"created_by": "chansearch run (unpruned model)"})
        return {"nets": nets, "teacher": str(teacher) if r.finetune.distill else None}

    def _finetune(self, folder: Path) -> dict:
        f = self.recipe.finetune
        upstream = self.records["prune" if self.recipe.supernet.method == "none" else "extract"]["outputs"]
        out = {}
        command = "train" if f.from_scratch else "finetune"
        for tag, net in upstream["nets"].items():
            run_dir = folder / f"{tag}_run"
            path = run_dir / "model.pt" if f.from_scratch else folder / f"{tag}.pt"
            if f.epochs == 0:
                path = Path(net["path"])
            elif not path.exists():
                if (run_dir / "last.pt").exists():
                    self.chansearch([command, "--resume", run_dir] + (["--quiet"] if self.quiet else []))
                else:
                    teacher = (["--teacher", upstream["teacher"], "--kd-weight", f.kd_weight, "--kd-temperature",
                                f.kd_temperature] if f.distill else [])
                    where = ["--from-scratch", "--out", run_dir] if f.from_scratch else ["-o", path, "--run-dir", run_dir]
                    self.chansearch([command, net["path"], *self._training_flags(f), *teacher, *where])
            out[tag] = {"path": str(path)}
        distributed.barrier()
        if distributed.is_main():
            for tag, net in upstream["nets"].items():
                out[tag]["test_before"] = _test(net["path"], self.recipe)
                out[tag]["test_after"] = _test(out[tag]["path"], self.recipe)
        return out

    def _export(self, folder: Path) -> dict:
        from compress.data import sample_images
        from compress.models import load_target
        from export import export_onnx, export_tflite
        e, spec = self.recipe.export, self.recipe.data.spec
        out = {}
        for tag, net in self.records["finetune"]["outputs"].items():
            model = load_target(net["path"])
            cfg = model.compress_cfg
            size = cfg["input_size"]
            images = sample_images(spec, False, e.parity_images, size, cfg["mean"], cfg["std"], seed=1)
            calib = sample_images(spec, True, e.calib_images, size, cfg["mean"], cfg["std"]) if e.int8 else None
            for fmt in e.formats:
                path = folder / f"{tag}{'_int8' if e.int8 and fmt == 'tflite' else ''}.{fmt}"
                self.commands.append(f"chansearch export {net['path']} --format {fmt} --calib-data {spec}"
                                     + (" --int8" if e.int8 and fmt == "tflite" else "") + f" -o {path}")
                try:
                    if fmt == "onnx":
                        report = export_onnx(model, path, size, images=images, tolerance=e.tolerance)
                    else:
                        report = export_tflite(model, path, size, int8=e.int8, calib_images=calib, images=images,
                                               tolerance=e.tolerance, min_agreement=e.min_agreement)
                    out[f"{tag}/{fmt}"] = {"path": str(path), "ok": True, "parity": report["parity"],
                                           "bytes": report["bytes"]}
                except CheckFailed as exc:
                    out[f"{tag}/{fmt}"] = {"path": str(path), "ok": False, "error": str(exc)}
        return out

    def _latency(self, folder: Path) -> dict:
        from export.latency import measure, measure_adb
        lat = self.recipe.latency
        budgets = {t.tag(): t.latency_ms or lat.budget_ms for t in self.recipe.targets()}
        out = {}
        for key, item in self.records["export"]["outputs"].items():
            if not Path(item["path"]).exists():
                continue
            options = dict(threads=lat.threads, warmup=lat.warmup, runs=lat.runs)
            self.commands.append(f"chansearch latency {item['path']} --threads {lat.threads} --runs {lat.runs}"
                                 + (f" --device {lat.device}" if lat.device != "local" else ""))
            if lat.device == "local":
                result = measure(item["path"], lat.backend, **options)
            else:
                serial = lat.device.partition(":")[2] or None
                result = measure_adb(item["path"], serial, **options)
            budget = budgets.get(key.split("/")[0])
            result.update(budget_ms=budget, ok=budget is None or result["median_ms"] <= budget)
            out[key] = result
        return out


def _test(path: str, recipe: Recipe) -> dict:
    """Top-1 on the data's evaluation split (capped by finetune.val_images when set)."""
    import torch
    from compress.data import eval_set, loader, random_subset
    from compress.evaluate import evaluate
    from compress.models import load_target
    model = load_target(path)
    cfg = model.compress_cfg
    ds = eval_set(recipe.data.spec, cfg["input_size"], cfg["mean"], cfg["std"], cfg["num_classes"])
    ds = random_subset(ds, recipe.finetune.val_images, recipe.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return evaluate(model.to(device), loader(ds, 256, recipe.data.workers), device, distributed_sum=False)


def run_recipe(path: str, overrides: list[str], quiet: bool = False) -> int:
    from compress.recipe import load_recipe
    recipe = load_recipe(path, overrides)
    _check_inputs(recipe)
    return Pipeline(recipe, quiet=quiet).run()


def _check_inputs(recipe: Recipe) -> None:
    """Fail before any work on inputs that do not exist."""
    from compress.data import DataSpec
    spec = DataSpec.parse(recipe.data.spec)
    if spec.kind != "synthetic" and not Path(spec.location).exists():
        raise CompressError(f"data.spec: '{spec.location}' does not exist (from {recipe.data.spec}); fix the path "
                            "in the recipe or override it: data.spec=cifar10:/path/to/cifar10.")
    name = recipe.model.name
    if name.endswith((".pt", ".pth")) and not Path(name).is_file():
        raise CompressError(f"model.name: checkpoint '{name}' does not exist.")
    if recipe.model.pretrained not in (None, "torchvision") and not Path(recipe.model.pretrained).is_file():
        raise CompressError(f"model.pretrained: '{recipe.model.pretrained}' is neither 'torchvision' nor an existing file.")
    if recipe.latency.device != "local" and not recipe.latency.device.startswith("adb"):
        raise CompressError(f"latency.device: '{recipe.latency.device}' is not local or adb[:SERIAL].")
