import numpy as np
import pytest
import torch

import compress
from compress import ChannelConfig, ChannelSpace, CompressError, config_for_macs, count
from compress.pruning.prune import prune
from compress.models import ZOO, build
from compress.pruning.importance import group_scores
from compress.pruning.space import widths_of

# ImageNet models are checked at 64x64 to keep CPU tests fast; the counts are exact at any size.
# a detector's coarsest pyramid level must hold more than one value per GroupNorm group: 2x2 at 128 px
SIZES = {name: (32 if e.cifar else 128 if e.task == "detect" else 64) for name, e in ZOO.items()}


def _space(name, size=None):
    size = size or SIZES[name]
    model = build(name).eval()
    return model, ChannelSpace.from_model(model, torch.randn(1, 3, size, size)), size


@pytest.mark.parametrize("name,macs,params", [
    ("mobilenet_v2", 300.8e6, 3.50e6), ("mobilenet_v3_large", 217e6, 5.48e6),
    ("mobilenet_v3_small", 56e6, 2.54e6), ("mobilenet_v1", 569e6, 4.23e6)])
def test_reference_counts_at_224(name, macs, params):
    model, space, _ = _space(name, 224)
    assert space.macs(space.max()) == pytest.approx(macs, rel=0.01)
    assert space.params(space.max()) == pytest.approx(params, rel=0.01)
    assert (space.macs(space.max()), space.params(space.max())) == count(model, 224)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ZOO))
def test_analytic_counts_equal_thop_on_random_configs(name):
    model, space, size = _space(name)
    rng = np.random.default_rng(0)
    x = torch.randn(2, 3, size, size)
    configs = [space.min()] + [space.sample(rng) for _ in range(10)]
    for config in configs:
        pruned = prune(model, config, space, importance="l1")
        assert widths_of(pruned, space) == config  # exact channel counts
        out = pruned(x)
        if ZOO[name].task == "segment":
            assert out["out"].shape == (2, ZOO[name].num_classes, size, size)
        elif ZOO[name].task == "detect":  # one class score per point of every pyramid level
            assert out["cls_logits"].shape[::2] == (2, ZOO[name].num_classes)
        else:
            assert out.shape == (2, ZOO[name].num_classes)
        assert (space.macs(config), space.params(config)) == count(pruned, size), config


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ZOO))
def test_identity_pruning(name):
    model, space, size = _space(name)
    x = torch.randn(2, 3, size, size)
    torch.testing.assert_close(prune(model, space.max(), space)(x), model(x), atol=1e-6, rtol=0)


def test_groups_tie_residual_depthwise_and_se_layers():
    _, space, _ = _space("mobilenet_v3_large_cifar")
    members = {m: g.name for g in space.groups for m in g.members}
    # the expand conv, the depthwise conv after it, the SE excite conv and the projection
    # input of one inverted-residual block share a group
    block = "features.4.block"
    tied = {members[f"{block}.0.0:out"], members[f"{block}.1.0:out"], members[f"{block}.2.fc2:out"],
            members[f"{block}.2.fc1:in"], members[f"{block}.3.0:in"]}
    assert len(tied) == 1
    # SE squeeze width is its own group
    assert members[f"{block}.2.fc1:out"] == f"{block}.2.fc1"
    # residual-coupled projections of one stage share a group
    assert members["features.5.block.3.0:out"] == members["features.6.block.3.0:out"]
    # the classifier's output is fixed: no group holds it
    assert not any(m.startswith("classifier.3:out") for m in members)


def test_config_json_round_trip_and_hash():
    _, space, _ = _space("mobilenet_v2_cifar")
    config = space.sample(np.random.default_rng(1))
    again = ChannelConfig.from_json(config.to_json())
    assert again == config and hash(again) == hash(config)
    assert space.validate(again) == config


def test_uniform_min_max():
    _, space, _ = _space("mobilenet_v2_cifar")
    half = space.uniform(0.5)
    assert half["features.0.0"] == 16 and half["features.18.0"] == 640
    assert all(space.min()[g.name] <= half[g.name] <= space.max()[g.name] for g in space.groups)
    assert space.macs(space.min()) < space.macs(half) < space.macs(space.max())


def test_validate_names_the_problem():
    _, space, _ = _space("mobilenet_v2_cifar")
    bad = dict(space.max())
    bad["features.0.0"] = 13
    with pytest.raises(CompressError, match=r"width 13 is not allowed for group 'features.0.0'"):
        space.validate(bad)
    with pytest.raises(CompressError, match=r"unknown group.*'features.0.O'.*did you mean 'features.0.0'"):
        space.validate({**space.max(), "features.0.O": 8})
    partial = dict(space.max())
    del partial["features.18.0"]
    with pytest.raises(CompressError, match="missing group.*features.18.0"):
        space.validate(partial)


@pytest.mark.parametrize("strategy", ["uniform", "global"])
def test_mac_target_lands_within_2_percent_below(strategy):
    model, space, _ = _space("mobilenet_v2_cifar")
    scores = group_scores(model, space) if strategy == "global" else None
    full = space.macs(space.max())
    for frac in (0.75, 0.5, 0.3):
        target = int(full * frac)
        macs = space.macs(config_for_macs(space, target, strategy, scores))
        assert 0.98 * target <= macs <= target


def test_impossible_target_reports_minimum():
    _, space, _ = _space("mobilenet_v2_cifar")
    floor = space.macs(space.min())
    with pytest.raises(CompressError, match=r"below the smallest config.*\d+\.\d+M MACs"):
        config_for_macs(space, floor - 1)


def test_global_strategy_keeps_important_groups_wider():
    model, space, _ = _space("mobilenet_v2_cifar")
    scores = {g.name: np.ones(g.max) for g in space.groups}
    scores["features.2.conv.0.0"] = np.full(96, 100.0)  # one group far more important
    config = config_for_macs(space, space.macs(space.max()) // 2, "global", scores)
    assert config["features.2.conv.0.0"] == 96


def test_many_configs_per_second_vectorized():
    _, space, _ = _space("mobilenet_v2_cifar")
    rng = np.random.default_rng(0)
    configs = [space.sample(rng) for _ in range(50)]
    batch = np.stack([space.vector(c) for c in configs])
    assert list(space.macs_many(batch)) == [space.macs(c) for c in configs]
    assert list(space.params_many(batch)) == [space.params(c) for c in configs]


@pytest.mark.parametrize("importance", ["l2", "first", "bn", "taylor", "energy"])
def test_importances_prune_to_exact_widths(importance):
    model, space, _ = _space("mobilenet_v2_cifar")
    config = space.uniform(0.5)
    batch = (torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    pruned = prune(model, config, space, importance=importance, batch=batch)
    assert widths_of(pruned, space) == config
    if importance == "first":  # keeps the first k output channels of the stem
        torch.testing.assert_close(pruned.features[0][0].weight, model.features[0][0].weight[:16])


def test_taylor_without_batch_is_a_clear_error():
    model, space, _ = _space("mobilenet_v2_cifar")
    with pytest.raises(CompressError, match="taylor.*needs a batch"):
        prune(model, space.uniform(0.5), space, importance="taylor")


def test_a_registered_importance_decides_which_channels_are_kept():
    """Importance is pluggable: a user's own object, registered by name, is what the prune stage
    and the settings use; channels it scores highest are the ones kept."""
    from compress.pruning.importance import Importance, register

    class Last(Importance):  # later channels matter more: the opposite of `first`
        needs_graph = False

        def scores(self, model, space, graph, batch):
            return {g.name: np.arange(g.max, dtype=np.float64) for g in space.groups}

    register("last", Last())
    model, space, _ = _space("mobilenet_v2_cifar")
    stem = space.groups[0]
    pruned = compress.prune(model, compress.PruneSettings(importance="last"), width=0.5).model
    kept = pruned.card.config[stem.name]
    conv = dict(pruned.named_modules())[stem.name]
    full = dict(model.named_modules())[stem.name]
    assert conv.out_channels == kept and torch.equal(conv.weight, full.weight[-kept:])
    with pytest.raises(CompressError, match="unknown importance 'nope'; choose one of energy, l1, .*, last"):
        compress.prune(model, compress.PruneSettings(importance="nope"), width=0.5)


def test_the_old_names_warn_and_forward():
    model, space, _ = _space("mobilenet_v2_cifar")
    config = space.uniform(0.5)
    with pytest.warns(DeprecationWarning, match="compress.prune\\(model, config, space, importance\\)"):
        old = compress.prune(model, config, space, importance="l1")
    with pytest.warns(DeprecationWarning, match="prune_target is deprecated"):
        pruned, _ = compress.prune_target(model, config=config, importance="l1")
    new = compress.prune(model, compress.PruneSettings(importance="l1"), config=config).model
    for a, b in zip(old.state_dict().values(), new.state_dict().values()):
        assert torch.equal(a, b)
    assert pruned.card.config == new.card.config
