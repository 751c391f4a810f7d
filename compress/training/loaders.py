"""The loaders a training run reads, from the one data source: a spec's split across torchrun
ranks (with the held-out images the search and keep_best use), or the user's own loaders
(with images held out of them for keep_best when no holdout loader is given)."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler

from compress.data.source import DataSource, Loaders
from compress.data.specs import collate_of, eval_set, holdout_indices, random_subset, train_holdout
from compress.errors import CompressError
from compress.models.card import ModelCard
from compress.settings import TrainSettings
from compress.training import distributed
from compress.training.keep_best import KEEP_BEST_SHARE


def loaders_for(source: DataSource, card: ModelCard, cfg: TrainSettings, validate: bool = True
                ) -> tuple[Loaders, np.ndarray | None]:
    """The run's loaders (train, val when `validate`, holdout when `keep_best`) and, for a
    spec, the indices of the training images held out (recorded in the run folder)."""
    if source.settings is not None:
        loaders, held = spec_loaders(source, card, cfg, validate)
    else:
        loaders, held = user_loaders(source.loaders, cfg), None
        loaders = loaders if validate else loaders._replace(val=None)
    if cfg.keep_best and loaders.holdout is None:
        raise CompressError("`keep_best` keeps the best state by held-out training images: set `holdout` > 0 (a "
                            "data spec), or pass Loaders(train, val, holdout) with a loader of images kept out of "
                            "training; or turn `keep_best` off.")
    return loaders, held


def spec_loaders(source: DataSource, card: ModelCard, cfg: TrainSettings, validate: bool = True
                 ) -> tuple[Loaders, np.ndarray]:
    """Loaders for a data spec, split across torchrun ranks, and the indices of the
    `cfg.holdout` training images held out (for the search)."""
    data = source.settings
    world, rank = distributed.world_size(), distributed.rank()
    if data.batch_size % world:
        raise CompressError(f"batch size {data.batch_size} does not split over {world} processes; "
                            f"use a multiple of {world}.")
    source.check_task(card.task)
    train_set, held_set, held = train_holdout(data.spec, card.input_size, card.mean, card.std, card.label_classes,
                                              cfg.holdout, cfg.seed, KEEP_BEST_SHARE if cfg.keep_best else 1.0)
    per_rank = data.batch_size // world
    if len(train_set) < data.batch_size:
        raise CompressError(f"data {data.spec} has {len(train_set)} training images, fewer than one batch "
                            f"({data.batch_size}); lower `batch_size`.")
    sampler = DistributedSampler(train_set, world, rank, shuffle=True, seed=cfg.seed, drop_last=True)
    train = DataLoader(train_set, per_rank, sampler=sampler, num_workers=data.workers, drop_last=True,
                       pin_memory=torch.cuda.is_available(), persistent_workers=data.workers > 0,
                       collate_fn=collate_of(train_set))
    val = None
    if validate:
        ds = random_subset(eval_set(data.spec, card.input_size, card.mean, card.std, card.label_classes),
                           cfg.val_images, cfg.seed)
        val = _in_order(ds, per_rank, data.workers, world, rank)
    holdout = None
    if held_set is not None and cfg.keep_best:
        holdout = _in_order(held_set, per_rank, data.workers, world, rank)
    return Loaders(train, val, holdout), held


def _in_order(ds: Dataset, batch_size: int, workers: int, world: int, rank: int) -> DataLoader:
    sampler = DistributedSampler(ds, world, rank, shuffle=False) if world > 1 else None
    return DataLoader(ds, batch_size, sampler=sampler, num_workers=workers, collate_fn=collate_of(ds))


def user_loaders(loaders: Loaders, cfg: TrainSettings) -> Loaders:
    """The user's loaders; with keep_best and no holdout loader, `cfg.holdout` images of the
    training set (at most a tenth of it) are kept out of training, picked with the seed, and
    the training loader is rebuilt around the rest with the same batch size and workers."""
    if not cfg.keep_best or loaders.holdout is not None:
        return loaders
    train = loaders.train
    dataset = train.dataset
    count = min(cfg.holdout, int(KEEP_BEST_SHARE * len(dataset)))
    if count < 1:
        raise CompressError(f"keep_best chooses the best state on held-out training images: `holdout` is "
                            f"{cfg.holdout} and a tenth of the {len(dataset)} training images is "
                            f"{int(KEEP_BEST_SHARE * len(dataset))}; give more images, or keep_best=False.")
    rest, held = (Subset(dataset, part.tolist()) for part in holdout_indices(len(dataset), count, cfg.seed))
    options = dict(batch_size=train.batch_size, num_workers=train.num_workers, collate_fn=train.collate_fn)
    return Loaders(DataLoader(rest, shuffle=True, drop_last=train.drop_last, **options), loaders.val,
                   DataLoader(held, **options))
