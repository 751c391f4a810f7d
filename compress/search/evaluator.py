"""Scoring a config on the held-out split, once: MACs/params analytically, then (within
budget only) BN recalibration and accuracy of the supernet at that config.

Every result is cached by config and saved to the search state file, so a search that is
run again (after an interruption, or with more iterations) evaluates nothing twice.
Under torchrun the uncached configs of a batch are split across ranks and gathered.
"""
from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from compress.training import distributed
from compress.errors import CompressError
from compress.training.evaluate import evaluate
from compress.files import atomic_write_json
from compress.pruning.space import ChannelConfig
from compress.supernet.dynamic import Supernet, recalibrate_bn

PRELOAD_BYTES = 2 << 30  # held-out images kept in memory up to this size
# Part of every state's fingerprint; raised when scores stop meaning what saved ones mean
# (2: held-out images picked at random; before, the first images of a class-sorted split).
SCORING_VERSION = 2


class HeldOut:
    """Recalibration and evaluation images picked at random (with `seed`) from the held-out
    split: disjoint when the split is large enough for both, else the recalibration images
    are reused for evaluation. Random, because datasets are often stored sorted by class
    (ImageFolder trees, many array dumps): the first N images would recalibrate BN on one
    class and score on it."""

    def __init__(self, dataset: Dataset, recal_images: int, eval_images: int, batch_size: int = 200,
                 seed: int = 0):
        n = len(dataset)
        if n == 0:
            raise CompressError("the held-out split is empty; train the supernet with `holdout` > 0.")
        order = np.random.default_rng(seed).permutation(n)
        recal = order[:min(recal_images, n)]
        rest = order[len(recal):] if n - len(recal) >= min(eval_images, n) else order
        self.recal = Subset(dataset, recal.tolist())
        self.eval = Subset(dataset, rest[:eval_images].tolist())
        self.batch_size = batch_size
        sample = dataset[0][0]
        self._preload = (len(self.recal) + len(self.eval)) * sample.numel() * sample.element_size() <= PRELOAD_BYTES
        self._cache: dict[str, list] = {}

    def batches(self, which: str) -> Iterable:
        ds = self.recal if which == "recal" else self.eval
        if not self._preload:
            return DataLoader(ds, self.batch_size, num_workers=2)
        if which not in self._cache:
            self._cache[which] = list(DataLoader(ds, self.batch_size))
        return self._cache[which]


class Evaluator:
    def __init__(self, supernet: Supernet, held_out: HeldOut, device: torch.device | str = "cpu",
                 latency: Callable[[ChannelConfig], float] | None = None, state_path: str | Path | None = None,
                 fingerprint: dict | None = None):
        self.supernet = supernet.to(device)
        self.space = supernet.space
        self.held_out = held_out
        self.device = device
        self.latency = latency
        self.cache: dict[ChannelConfig, dict] = {}
        self.fresh = 0  # configs scored by this process (not from the cache)
        self.state_path = Path(state_path) if state_path else None
        self.fingerprint = {**(fingerprint or {}), "scoring": SCORING_VERSION}
        if self.state_path and self.state_path.exists():
            self._load_state()

    def cost(self, config: Mapping[str, int]) -> dict:
        cost = {"macs": self.space.macs(config), "params": self.space.params(config)}
        if self.latency is not None:
            cost["latency_ms"] = self.latency(ChannelConfig(config))
        return cost

    @torch.no_grad()
    def _score(self, config: ChannelConfig) -> dict:
        recalibrate_bn(self.supernet, config, self.held_out.batches("recal"), self.device)
        metrics = evaluate(self.supernet, self.held_out.batches("eval"), self.device, distributed_sum=False)
        return {**self.cost(config), "top1": metrics["top1"], "loss": metrics["loss"]}

    def score(self, config: Mapping[str, int]) -> dict:
        return self.score_many([config])[0]

    def score_many(self, configs: list[Mapping[str, int]], progress: bool = False) -> list[dict]:
        """Scores of `configs` (cached ones are not recomputed; under torchrun each rank
        scores a share of the rest)."""
        configs = [ChannelConfig(c) for c in configs]
        todo = list(dict.fromkeys(c for c in configs if c not in self.cache))
        rank, world = distributed.rank(), distributed.world_size()
        mine = todo[rank::world]
        results = []
        for config in tqdm(mine, desc="evaluate", unit="config", leave=False,
                           disable=not (progress and distributed.is_main() and len(mine) > 1 and sys.stderr.isatty())):
            results.append((config.to_dict(), self._score(config)))
            self.fresh += 1
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, results)
            results = [r for part in gathered for r in part]
        for config, score in results:
            self.cache[ChannelConfig(config)] = score
        if results:
            self.save_state()
        return [{**self.cache[c], "config": c} for c in configs]

    # ---- state -------------------------------------------------------------------------------
    def save_state(self) -> None:
        if self.state_path is None or not distributed.is_main():
            return
        entries = [{"config": c.to_dict(), **s} for c, s in self.cache.items()]
        atomic_write_json(self.state_path, {"fingerprint": self.fingerprint, "evaluated": entries}, indent=None)

    def _load_state(self) -> None:
        try:
            state = json.loads(self.state_path.read_text())
            saved, entries = state["fingerprint"], state["evaluated"]
            loaded = {ChannelConfig(e["config"]): {k: v for k, v in e.items() if k != "config"} for e in entries}
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as exc:
            raise CompressError(f"search state '{self.state_path}' is corrupt ({type(exc).__name__}: {exc}); "
                                "delete it to start the search over.") from None
        if saved != self.fingerprint:
            diff = [f"{k}: {saved.get(k)!r} -> {self.fingerprint.get(k)!r}" for k in sorted(
                set(saved) | set(self.fingerprint)) if saved.get(k) != self.fingerprint.get(k)]
            raise CompressError(f"search state '{self.state_path}' was made with other evaluation settings "
                                f"({'; '.join(diff)}); its scores do not apply. Use another `out` folder, or "
                                "delete the state file to start over.")
        self.cache.update(loaded)
