"""compress: make CNNs small and fast for edge devices.

The stage API (`compress.stages`) has one function per stage; `compress.compress` runs a
whole compression of your own model from DataLoaders in one call.
"""
from compress import stages
from compress.card import ModelCard, card_of, describe
from compress.checkpoint import load, load_target, save_checkpoint
from compress.errors import CheckFailed, CompressError
from compress.models import build
from compress.one_call import CompressReport, compress
from compress.profile import count
from compress.prune import config_for_macs, prune, prune_target
from compress.settings import (DataSettings, ExportSettings, FinetuneSettings, LatencySettings, PruneSettings,
                               SearchSettings, SupernetSettings, Target, TrainSettings)
from compress.space import ChannelConfig, ChannelGroup, ChannelSpace
from compress.train import Loaders

__version__ = "0.1.0"
__all__ = ["ChannelConfig", "ChannelGroup", "ChannelSpace", "CheckFailed", "CompressError", "CompressReport",
           "DataSettings", "ExportSettings", "FinetuneSettings", "LatencySettings", "Loaders", "ModelCard",
           "PruneSettings", "SearchSettings", "SupernetSettings", "Target", "TrainSettings", "build", "card_of",
           "compress", "config_for_macs", "count", "describe", "load", "load_target", "prune", "prune_target",
           "save_checkpoint", "stages"]
