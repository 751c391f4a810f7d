"""Pruning: the channel space of a model (space), channel importance (importance, energy),
how a budget is spread over the groups (allocation), the cut itself (prune), and putting the
pruned net's outputs back (reconstruct, batchnorm, moments); MAC and parameter counts
(profile)."""
