"""The stage API: one function per stage of the pipeline (train / fine-tune, supernet, search,
extract, prune, export, latency, latency table), each taking the settings model of its
recipe section and a data source (a spec, DataSettings or your own Loaders) and returning a
typed result. `chansearch`, the recipe runner and `compress.compress` are thin front ends over
these (the recipe runner walks them through `compress.stages.table`); a Python program calls
them directly.

Every stage that writes a run folder locks it for the run and refuses to start a new run
over an old one (resume it instead); every file it writes is written atomically.
"""
from compress.stages.exporting import export, latencies, latency, latency_table, lut_model_space
from compress.stages.extraction import Extracted, extract
from compress.stages.folders import ARGS_FILE, device, run_folder
from compress.stages.pruning import Pruned, prune, pruning_batch
from compress.stages.searching import SearchRun, find_search, open_search, search, search_target
from compress.stages.supernets import SupernetRun, held_out, supernet_file, supernet_teacher, train_supernet
from compress.stages.training import Trained, train

__all__ = ["ARGS_FILE", "Extracted", "Pruned", "SearchRun", "SupernetRun", "Trained", "device", "export", "extract",
           "find_search", "held_out", "latencies", "latency", "latency_table", "lut_model_space", "open_search",
           "prune", "pruning_batch", "run_folder", "search", "search_target", "supernet_file", "supernet_teacher",
           "train", "train_supernet"]
