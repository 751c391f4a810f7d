"""`chansearch run recipe.yaml`: the recipe's stages in order, each in its own folder of the
run (`runs/<name>/<stage>/`), resumable.

A stage is skipped when it finished with the same inputs (its settings plus the
fingerprints of the stages it reads); a stage whose inputs changed is moved aside to
`<stage>.previous/` and re-run, and so is everything after it. An interrupted stage
continues from its own checkpoints (training `last.pt`, the search's state file, the
per-target files it already wrote). The stages are the table of
`compress.app.stage_table`: each calls its function of the stage API (`compress.stages`) and
returns a typed result (`compress.app.results`); training and search run on every rank under
torchrun, the other stages on rank 0. The report reads the typed results and lists the
`chansearch` command equivalent to each stage, derived from the same settings.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from compress.app.recipe import Recipe, dump, load_recipe
from compress.app.report import write_report
from compress.app.results import from_json, to_json
from compress.app.run_context import RunContext
from compress.app.stage_table import STAGES, Stage
from compress.data.specs import DataSpec
from compress.errors import CheckFailed, CompressError
from compress.files import RunLock, atomic_write_json, atomic_write_text
from compress.logs import notes
from compress.stages.folders import move_aside
from compress.training import distributed

MARKER = "stage.json"


class Pipeline:
    """Walks the stage table over one recipe, skipping what finished with the same inputs."""

    def __init__(self, recipe: Recipe, quiet: bool = False):
        self.ctx = RunContext(recipe, quiet)
        self.fingerprints: dict[str, str] = {}

    def run(self) -> int:
        """Run (or resume) every stage, holding the run folder for the whole run."""
        distributed.init()
        if not distributed.is_main():
            return self._stages()
        with RunLock(self.ctx.dir):
            return self._stages()

    def _stages(self) -> int:
        ctx = self.ctx
        if distributed.is_main():
            atomic_write_text(ctx.dir / "recipe.yaml", dump(ctx.recipe))
        for stage in STAGES:
            if stage.applies(ctx.recipe):
                self.stage(stage)
        failures = write_report(ctx) if distributed.is_main() else []
        distributed.barrier()
        if failures:
            raise CheckFailed(f"{len(failures)} check(s) failed: {'; '.join(failures)}. Details in "
                              f"{ctx.dir / 'report.md'}.")
        return 0

    def stage(self, stage: Stage) -> None:
        """Run `stage` into its folder, unless it already finished with these inputs; its typed
        result goes to the context either way."""
        ctx = self.ctx
        fingerprint = hashlib.sha1(json.dumps(
            {"settings": stage.inputs(ctx.recipe), "upstream": [self.fingerprints[u] for u in stage.upstream(ctx.recipe)]},
            sort_keys=True, default=str).encode()).hexdigest()[:16]
        folder = ctx.dir / stage.name
        marker = folder / MARKER
        if marker.exists() and json.loads(marker.read_text())["fingerprint"] == fingerprint:
            ctx.log(f"{stage.name}: done earlier, skipped")
        else:
            self._prepare(stage.name, folder, fingerprint)
            ctx.log(f"{stage.name}: running")
            began, first_command = time.time(), len(ctx.commands)
            result = stage.run(ctx, folder) if stage.everywhere or distributed.is_main() else None
            if distributed.is_main():
                atomic_write_json(marker, {"fingerprint": fingerprint, "outputs": to_json(result),
                                           "seconds": round(time.time() - began, 1),
                                           "commands": ctx.commands[first_command:]})
            ctx.commands = ctx.commands[:first_command]  # read back below, as a skipped stage's are
            distributed.barrier()
        record = json.loads(marker.read_text())
        self.fingerprints[stage.name] = fingerprint
        ctx.results[stage.name] = from_json(stage.result, record["outputs"])
        ctx.seconds[stage.name] = record["seconds"]
        ctx.commands += record.get("commands", [])

    def _prepare(self, name: str, folder: Path, fingerprint: str) -> None:
        """A folder made with other inputs is kept aside, never reused; one of an interrupted
        run with the same inputs is resumed from its own checkpoints."""
        started = folder / "started.json"
        if distributed.is_main() and folder.exists():
            before = json.loads(started.read_text())["fingerprint"] if started.exists() else None
            if before != fingerprint:
                aside = move_aside(folder)
                self.ctx.log(f"{name}: inputs changed, re-running (the old results are in {aside})")
            else:
                self.ctx.log(f"{name}: resuming an interrupted stage")
        distributed.barrier()
        if distributed.is_main():
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_json(started, {"fingerprint": fingerprint})
        distributed.barrier()


def run_recipe(path: str, overrides: list[str], quiet: bool = False) -> int:
    recipe = for_this_machine(load_recipe(path, overrides))
    _check_inputs(recipe)
    return Pipeline(recipe, quiet=quiet).run()


def for_this_machine(recipe: Recipe) -> Recipe:
    """Settings this machine cannot run fall back before any work, each with one line saying
    so: mixed precision (`amp`) needs a CUDA device, so a GPU recipe also runs on a CPU."""
    if torch.cuda.is_available():
        return recipe
    update = {}
    for section in ("transfer", "supernet", "finetune"):
        settings = getattr(recipe, section)
        if settings is not None and settings.amp != "none":
            notes.info(f"{section}.amp: {settings.amp} needs a CUDA device and this machine has none: the {section} "
                       f"runs in float32 (set {section}.amp=none to silence this)")
            update[section] = settings.model_copy(update={"amp": "none"})
    return recipe.model_copy(update=update)


def _check_inputs(recipe: Recipe) -> None:
    """Fail before any work on inputs that do not exist."""
    spec = DataSpec.parse(recipe.data.spec).images
    if spec.kind not in ("synthetic", "shapes", "shapeboxes") and not Path(spec.location).exists():
        raise CompressError(f"data.spec: '{spec.location}' does not exist (from {recipe.data.spec}); fix the path "
                            "in the recipe or override it: data.spec=cifar10:/path/to/cifar10.")
    name = recipe.model.name
    if name.endswith((".pt", ".pth")) and not Path(name).is_file():
        raise CompressError(f"model.name: checkpoint '{name}' does not exist.")
    if recipe.model.pretrained not in (None, "torchvision", "timm") and not Path(recipe.model.pretrained).is_file():
        raise CompressError(f"model.pretrained: '{recipe.model.pretrained}' is neither 'torchvision', 'timm' nor an "
                            "existing file.")
