"""compress: make CNNs small and fast for edge devices.

The stage API (`compress.stages`) has one function per stage; `compress.compress` runs a
whole compression of your own model from DataLoaders in one call. Those two (and `Loaders`)
load on first use (PEP 562): importing `compress` does not pull in the data pipeline and the
training loop.
"""
import importlib

from compress.models.card import ModelCard, card_of, describe
from compress.checkpoint import load, load_target, save_checkpoint
from compress.errors import CheckFailed, CompressError
from compress.models import build
from compress.pruning.profile import count
from compress.pruning.prune import config_for_macs, prune, prune_target
from compress.settings import (DataSettings, ExportSettings, FinetuneSettings, LatencySettings, PruneSettings,
                               SearchSettings, SupernetSettings, Target, TrainSettings)
from compress.pruning.space import ChannelConfig, ChannelGroup, ChannelSpace

__version__ = "0.1.0"

_LAZY = {"compress": "compress.app.one_call", "CompressReport": "compress.app.one_call", "Loaders": "compress.training.loop"}
__all__ = ["ChannelConfig", "ChannelGroup", "ChannelSpace", "CheckFailed", "CompressError", "CompressReport",
           "DataSettings", "ExportSettings", "FinetuneSettings", "LatencySettings", "Loaders", "ModelCard",
           "PruneSettings", "SearchSettings", "SupernetSettings", "Target", "TrainSettings", "build", "card_of",
           "compress", "config_for_macs", "count", "describe", "load", "load_target", "prune", "prune_target",
           "save_checkpoint", "stages"]


def __getattr__(name: str):
    if name == "stages":
        return importlib.import_module("compress.stages")
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'compress' has no attribute '{name}'")
