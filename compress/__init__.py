"""compress: make CNNs small and fast for edge devices.

The stage API (`compress.stages`) has one function per stage; `compress.prune` is its prune
stage, the one entry point for pruning; `compress.compress` runs a whole compression of your
own model from DataLoaders in one call, through the same stages. Those (and `Loaders`) load on
first use (PEP 562): importing `compress` does not pull in the data pipeline and the training
loop.
"""
import importlib

from compress.checkpoint import load, load_target, save_checkpoint
from compress.deprecated import prune, prune_target
from compress.errors import CheckFailed, CompressError
from compress.models import build
from compress.models.card import ModelCard, card_of, describe
from compress.pruning.allocation import allocate, config_for_macs
from compress.pruning.importance import Importance, register
from compress.pruning.profile import count
from compress.pruning.space import ChannelConfig, ChannelGroup, ChannelSpace
from compress.settings import (DataSettings, ExportSettings, FinetuneSettings, LatencySettings, PruneSettings,
                               SearchSettings, SupernetSettings, Target, TrainSettings)

__version__ = "0.1.0"

_LAZY = {"compress": "compress.app.one_call", "CompressReport": "compress.app.one_call",
         "Loaders": "compress.data.source", "DataSource": "compress.data.source"}
__all__ = ["ChannelConfig", "ChannelGroup", "ChannelSpace", "CheckFailed", "CompressError", "CompressReport",
           "DataSettings", "DataSource", "ExportSettings", "FinetuneSettings", "Importance", "LatencySettings",
           "Loaders", "ModelCard", "PruneSettings", "SearchSettings", "SupernetSettings", "Target", "TrainSettings",
           "allocate", "build", "card_of", "compress", "config_for_macs", "count", "describe", "load", "load_target",
           "prune", "prune_target", "register", "save_checkpoint", "stages"]


def __getattr__(name: str):
    if name == "stages":
        return importlib.import_module("compress.stages")
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'compress' has no attribute '{name}'")
