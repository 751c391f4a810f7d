"""The extract stage: a searched config as a standalone pruned checkpoint, its weights the
supernet's (BN recalibrated on the search's held-out images) or the unpruned teacher's (cut
and refitted as `prune` does)."""
from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from compress.checkpoint import save_checkpoint
from compress.data.source import DataSource
from compress.errors import CompressError
from compress.logs import notes
from compress.models.card import card_of
from compress.search import RESULT_FILE
from compress.settings import HeldOutScoring, PruneSettings
from compress.stages.folders import device
from compress.stages.pruning import prune
from compress.stages.searching import find_search, search_target
from compress.stages.supernets import held_out, supernet_file
from compress.supernet import load_supernet, recalibrate_bn
from compress.training.evaluate import evaluate


@dataclass
class Extracted:
    model: nn.Module
    checkpoint: Path
    target: dict  # the search's entry: label, budget, config, MACs, held-out top-1
    heldout_top1: float  # the extracted net's own on the same held-out images (the search's score, cut
    # from the supernet; its own, cut from the teacher)


def extract(run: str | Path, output: str | Path, target: str | None = None,
            search_dir: str | Path | None = None, provenance: dict | None = None,
            teacher: nn.Module | None = None, prune_settings: PruneSettings = PruneSettings(),
            data=None, model: nn.Module | None = None) -> Extracted:
    """The searched config of `target` as a standalone pruned checkpoint: BN recalibrated on
    the search's held-out images, outputs equal to the supernet's at that config. With
    `teacher` (the unpruned pretrained model the supernet was trained from), the config is
    cut from the teacher's own weights instead, the way `prune --data` cuts a config
    (`prune_settings`, on the supernet's training data): the search chose the widths, the
    teacher keeps its weights. `data`: the Loaders a supernet trained on your own loaders was
    trained with; `model`: the unpruned model of a supernet of your own architecture."""
    folder = find_search(run, search_dir)
    result = json.loads((folder / RESULT_FILE).read_text())
    entry = search_target(result, target, str(folder / RESULT_FILE))
    evaluation = result["evaluation"]
    # recalibrated and scored at the model's own input size, whatever size the search scored at
    scoring = HeldOutScoring(recal_images=evaluation["recal_images"], eval_images=evaluation["eval_images"])
    supernet, record = load_supernet(supernet_file(run), model=copy.deepcopy(model))
    same_size = evaluation.get("score_size") in (None, supernet.card.input_size)
    source = DataSource.of(data if data is not None else evaluation["data"])
    held = held_out(supernet, record["holdout"], scoring, source)
    provenance = {"created_by": "extract", "supernet": str(run), "method": record["method"], "search": str(folder),
                  "target": entry["label"], "heldout_top1": entry["top1"], **(provenance or {})}
    if teacher is not None:
        if card_of(teacher).arch != supernet.card.arch or card_of(teacher).pruned:
            raise CompressError(f"--teacher must be the unpruned model the supernet '{run}' was trained from "
                                f"({supernet.card.arch}); got {card_of(teacher).arch}"
                                f"{' (pruned)' if card_of(teacher).pruned else ''}. Pass that model's checkpoint.")
        cut = prune(teacher, prune_settings, config=entry["config"], data=source)
        model = cut.model
        scored = evaluate(model, held.batches("eval"), device(), distributed_sum=False)["top1"]
        save_checkpoint(output, model, provenance={**provenance, **cut.restored, "weights": "teacher",
                                                   "heldout_top1_extracted": scored})
        return Extracted(model, Path(output), entry, scored)
    supernet.to(device())
    recalibrate_bn(supernet, entry["config"], held.batches("recal"), device())
    model = supernet.extract(entry["config"])
    # the extracted net must score what the search said it would, on the same images
    scored = evaluate(model, held.batches("eval"), device(), distributed_sum=False)["top1"]
    images = len(held.eval)
    noise = 3 * math.sqrt(max(entry["top1"] * (1 - entry["top1"]), 1e-4) / max(images, 1)) + 0.005
    if same_size and abs(scored - entry["top1"]) > noise:
        notes.warning(f"the extracted net of {entry['label']} scores {scored:.2%} held-out top-1, where the search "
                      f"scored its config at {entry['top1']:.2%} on the same {images} images: the supernet's "
                      "shared weights at this config are not the extracted net's. Report this with the run folder.")
    save_checkpoint(output, model, provenance={**provenance, "heldout_top1_extracted": scored})
    return Extracted(model, Path(output), entry, scored)
