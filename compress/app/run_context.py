"""What every stage of a recipe run shares: the recipe, the run folder, the typed results of
the stages before it, the equivalent `chansearch` commands recorded so far, and how the run
loads and measures its models."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from compress.app.flags import command_line
from compress.app.recipe import Recipe
from compress.checkpoint import load_target
from compress.data.specs import check_task, eval_set, loader, random_subset
from compress.models.sources import is_code
from compress.settings import HeldOutScoring, SearchSettings
from compress.training import distributed
from compress.training.evaluate import evaluate


class RunContext:
    def __init__(self, recipe: Recipe, quiet: bool = False):
        self.recipe = recipe
        self.dir = recipe.run_dir()
        self.quiet = quiet
        self.results: dict[str, object] = {}  # stage name -> its typed result (compress.app.results)
        self.seconds: dict[str, float] = {}
        self.commands: list[str] = []  # the equivalent chansearch commands, for the report

    def log(self, msg: str) -> None:
        if distributed.is_main():
            print(f"[{self.recipe.name}] {msg}", flush=True)

    def command(self, *args, **kwargs) -> None:
        """Record the `chansearch` command equivalent to what a stage is about to do, from the
        same settings objects the stage is called with."""
        self.commands.append(command_line(*args, **kwargs))

    # ---- the models of the run ---------------------------------------------------------------
    def trusts_code(self) -> bool:
        """The run rebuilds its checkpoints with the recipe's own factory when it names one."""
        return self.recipe.model.trust_code or is_code(self.recipe.model.name)

    def trust_flag(self) -> list:
        return ["--trust-code"] if self.trusts_code() else []

    def load(self, path: str | Path, **kwargs) -> nn.Module:
        """A checkpoint of this run; one made from the recipe's own factory (model.name:
        file.py:factory) is rebuilt with it, which the recipe asked for by naming it."""
        return load_target(str(path), trust_code=self.trusts_code(), **kwargs)

    def given_model(self) -> nn.Module:
        m = self.recipe.model
        return load_target(m.name, m.num_classes, m.width_mult, m.pretrained, m.input_size, task=m.task)

    def model(self) -> nn.Module:
        """The model to compress: the recipe's, or the transfer stage's when there is one."""
        if self.recipe.transfer is not None:
            return self.load(self.results["transfer"].model)
        return self.given_model()

    def source(self) -> tuple[str, list]:
        """How the equivalent commands name the model to compress: its name and model flags."""
        if self.recipe.transfer is not None:
            return self.results["transfer"].model, []
        return self.recipe.model.name, [self.recipe.model]

    def scoring(self) -> HeldOutScoring:
        """The search's held-out scoring, which the supernet's summary and the teacher use too."""
        search: SearchSettings = self.recipe.search
        return HeldOutScoring(**search.model_dump(include=set(HeldOutScoring.model_fields)))

    def test(self, model: nn.Module | str | Path, teacher: nn.Module | None = None) -> dict:
        """The task's metric on the data's evaluation split (capped by finetune.val_images when
        set), with the fidelity to `teacher`'s predictions when given."""
        model = model if isinstance(model, nn.Module) else self.load(model)
        card, recipe = model.card, self.recipe
        check_task(recipe.data.spec, card.task)
        ds = eval_set(recipe.data.spec, card.input_size, card.mean, card.std, card.label_classes)
        ds = random_subset(ds, recipe.finetune.val_images, recipe.seed)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return evaluate(model.to(device), loader(ds, 64, recipe.data.workers), device, distributed_sum=False,
                        teacher=teacher.to(device) if teacher is not None else None)
