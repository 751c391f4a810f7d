"""The one data source every stage takes: a data spec (with its batch size and workers), or a
user's own DataLoaders. Stages ask it for what they need (a labelled sample to rank channels
and refit on, the loaders to train on) and never look at which kind it is."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader

from compress.data.specs import check_task, sample_labelled
from compress.errors import CompressError
from compress.settings import DataSettings


class Loaders(NamedTuple):
    """A user's own data: a training loader and, optionally, one to validate each epoch on and
    one of held-out training images to keep the best state by (`keep_best`)."""

    train: DataLoader
    val: DataLoader | None = None
    holdout: DataLoader | None = None


@dataclass(frozen=True)
class DataSource:
    settings: DataSettings | None = None
    loaders: Loaders | None = None

    @classmethod
    def of(cls, data: DataSource | DataSettings | Loaders | DataLoader | str) -> DataSource:
        """A data source from a spec string, DataSettings, Loaders or one training DataLoader."""
        if isinstance(data, DataSource):
            return data
        if isinstance(data, str):
            return cls(settings=DataSettings(spec=data))
        if isinstance(data, DataSettings):
            return cls(settings=data)
        if isinstance(data, DataLoader):
            return cls(loaders=Loaders(data))
        if isinstance(data, Loaders):
            return cls(loaders=data)
        raise CompressError(f"data must be a data spec (cifar10:DIR, ...), DataSettings, Loaders or a DataLoader; got "
                            f"{type(data).__name__}.")

    @property
    def spec(self) -> str | None:
        """The data spec, or None for a user's loaders (which no later process can reopen)."""
        return self.settings.spec if self.settings else None

    @property
    def name(self) -> str:
        """What provenance records say the data was."""
        return self.spec or "DataLoader"

    def check_task(self, task: str) -> None:
        if self.spec:
            check_task(self.spec, task)

    def sample(self, count: int, input_size: int, mean, std, device: torch.device | str = "cpu",
               seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | list]:
        """`count` training images and their targets, without augmentation where a spec says
        how: picked with `seed` from a spec, the first `count` of the training loader's (the
        user's transforms and order) from loaders."""
        if self.spec:
            images, targets = sample_labelled(self.spec, True, count, input_size, mean, std, seed=seed)
        else:
            images, targets = _first(self.loaders.train, count)
        return images.to(device), to_device(targets, device)


def _first(loader: DataLoader, count: int) -> tuple[torch.Tensor, torch.Tensor | list]:
    images, targets, seen = [], [], 0
    for x, y in loader:
        images.append(x)
        targets.append(y)
        seen += len(x)
        if seen >= count:
            break
    if isinstance(targets[0], torch.Tensor):
        return torch.cat(images)[:count], torch.cat(targets)[:count]
    return torch.cat(images)[:count], [t for batch in targets for t in batch][:count]


def to_device(targets, device):
    """Labels or masks (a tensor), or detection targets (a list of dicts of tensors), on `device`."""
    if isinstance(targets, torch.Tensor):
        return targets.to(device, non_blocking=True)
    return [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
