"""compress: make CNNs small and fast for edge devices."""
from compress.checkpoint import load, save_checkpoint
from compress.errors import CompressError
from compress.models import build, load_target
from compress.profile import count
from compress.prune import config_for_macs, prune, prune_target
from compress.space import ChannelConfig, ChannelGroup, ChannelSpace

__version__ = "0.1.0"
__all__ = ["ChannelConfig", "ChannelGroup", "ChannelSpace", "CompressError", "build", "config_for_macs",
           "count", "load", "load_target", "prune", "prune_target", "save_checkpoint"]
