"""Old public names, kept for one release: each warns and forwards to what replaced it (see
docs/guide.md, "Python API")."""
from __future__ import annotations

import warnings
from collections.abc import Mapping



def prune(model, *args, **kwargs):
    """`compress.prune`: the one prune entry point, `compress.stages.prune` (budgets, a config
    or a width; returns a `Pruned`). The old form, `prune(model, config, space, importance)`
    returning the module, still works for this release with a DeprecationWarning."""
    from compress.stages import prune as stage_prune
    # the new form takes PruneSettings second and no `importance`, `space`, `batch` or `input_size`
    old = bool(args and isinstance(args[0], Mapping)) or bool({"importance", "space", "batch", "input_size"} & set(kwargs))
    if not old:
        return stage_prune(model, *args, **kwargs)
    warnings.warn("compress.prune(model, config, space, importance) is deprecated: use compress.prune(model, "
                  "PruneSettings(importance=...), config=...) (compress.stages.prune), which returns a Pruned "
                  "(.model is the module).", DeprecationWarning, stacklevel=2)
    from compress.pruning.prune import prune as exact
    return exact(model, *args, **kwargs)


def prune_target(model, *args, **kwargs):
    """`compress.prune_target` is deprecated: `compress.prune(model, PruneSettings(...), macs=...,
    config=..., width=...)` does the same and returns a `Pruned`."""
    warnings.warn("compress.prune_target is deprecated: use compress.prune(model, PruneSettings(importance=..., "
                  "strategy=...), macs=... | params=... | config=... | width=...).", DeprecationWarning, stacklevel=2)
    from compress.pruning.prune import prune_target as core
    return core(model, *args, **kwargs)
