"""compress: make CNNs small and fast for edge devices.

The stage API (`compress.stages`) has one function per stage; `compress.compress` runs a
whole compression of your own model from DataLoaders in one call. Names load on first use
(PEP 562), so `chansearch --help` and `python -m compress.data` do not import torch.
"""
import importlib

__version__ = "0.1.0"

_HOME = {
    "ChannelConfig": "compress.space", "ChannelGroup": "compress.space", "ChannelSpace": "compress.space",
    "CheckFailed": "compress.errors", "CompressError": "compress.errors",
    "CompressReport": "compress.one_call", "compress": "compress.one_call",
    "DataSettings": "compress.settings", "ExportSettings": "compress.settings", "FinetuneSettings": "compress.settings",
    "LatencySettings": "compress.settings", "PruneSettings": "compress.settings", "SearchSettings": "compress.settings",
    "SupernetSettings": "compress.settings", "Target": "compress.settings", "TrainSettings": "compress.settings",
    "Loaders": "compress.train", "ModelCard": "compress.card", "card_of": "compress.card", "describe": "compress.card",
    "build": "compress.models", "config_for_macs": "compress.prune", "prune": "compress.prune",
    "prune_target": "compress.prune", "count": "compress.profile", "load": "compress.checkpoint",
    "load_target": "compress.checkpoint", "save_checkpoint": "compress.checkpoint",
}
__all__ = sorted(_HOME) + ["stages"]


def __getattr__(name: str):
    if name == "stages":
        return importlib.import_module("compress.stages")
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module 'compress' has no attribute '{name}'")


def __dir__() -> list[str]:
    return __all__
