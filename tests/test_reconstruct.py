"""Pruning a trained net without wrecking it: the channel map, data-driven importance and the
least-squares refit of the pruned layers."""
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import compress
from compress.models import build
from compress.prune import group_scores, prune_with_map
from compress.reconstruct import mixes_channels, reconstruct
from compress.settings import PruneSettings
from compress.space import ChannelSpace

TRAINED = Path(__file__).resolve().parent / "data" / "mobilenet_v2_cifar_w035_trained.pt"


@pytest.mark.parametrize("name", ["mobilenet_v2_cifar", "mobilenet_v3_small_cifar"])
def test_channel_map_names_the_weights_each_layer_kept(name):
    """Every pruned conv/linear weight is exactly the unpruned weight at the kept output and
    input indices the map reports (residual groups, SE blocks and the classifier included)."""
    model = build(name).eval()
    space = ChannelSpace.from_model(model, torch.randn(1, 3, 32, 32))
    config = space.uniform(0.5)
    pruned, kept = prune_with_map(model, config, space, importance="l1")
    assert kept, "nothing was pruned"
    for layer_name, (out_idx, in_idx) in kept.items():
        before, after = model.get_submodule(layer_name).weight, pruned.get_submodule(layer_name).weight
        torch.testing.assert_close(after, before[out_idx][:, in_idx], rtol=0, atol=0)
    untouched = [n for n, m in model.named_modules() if mixes_channels(m) and n not in kept]
    for layer_name in untouched:
        assert pruned.get_submodule(layer_name).weight.shape == model.get_submodule(layer_name).weight.shape


def _net_with_a_duplicate_channel() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 6, 1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))
    with torch.no_grad():
        for bn in (net[1], net[4]):
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.2, 0.2)
            bn.running_mean.uniform_(-0.1, 0.1), bn.running_var.uniform_(0.5, 2)
        net[0].weight[7] = net[0].weight[2]  # channel 7 repeats channel 2 exactly
        for t in (net[1].weight, net[1].bias, net[1].running_mean, net[1].running_var):
            t[7] = t[2]
    return net.eval()


def test_refit_recovers_a_redundant_channel_exactly():
    """Channel 7 duplicates channel 2; pruning it changes the output, and the least-squares
    refit of the next conv (weight of 2 := weight of 2 + weight of 7) restores it."""
    net = _net_with_a_duplicate_channel()
    x = torch.randn(64, 3, 12, 12)
    space = ChannelSpace.from_model(net, x[:1], divisor=1)
    group = next(g for g in space.groups if g.name == "0")
    scores = {g.name: np.arange(g.max, 0, -1.0) for g in space.groups}  # drops the last channel
    pruned, kept = prune_with_map(net, {**space.max(), "0": group.max - 1}, space, scores=scores)
    assert kept["3"] == (list(range(6)), list(range(7)))
    with torch.no_grad():
        assert (pruned(x) - net(x)).abs().max() > 1e-2
        assert reconstruct(net, pruned, kept, x, ridge=1e-9) == ["3", "8"]
        torch.testing.assert_close(pruned(x), net(x), atol=1e-4, rtol=1e-4)


def test_energy_importance_ignores_how_weights_are_scaled():
    """Scaling one stem channel's conv weight by 100 and its BN variance by 100^2 leaves the
    network's function unchanged. Weight magnitude (l1) then ranks that channel first;
    energy, measured on what the channel carries, ranks the stem group as before."""
    model = compress.load(TRAINED).eval()
    space = ChannelSpace.from_model(model, torch.randn(1, 3, 32, 32))
    images = torch.randn(64, 3, 32, 32)
    batch = (images, torch.zeros(64, dtype=torch.long))
    stem = space.groups[0].name
    before = {imp: group_scores(model, space, imp, batch)[stem] for imp in ("energy", "l1")}
    scaled = compress.load(TRAINED).eval()
    weakest = int(np.argmin(before["l1"]))
    with torch.no_grad():
        scaled.features[0][0].weight[weakest] *= 100
        scaled.features[0][1].running_mean[weakest] *= 100
        scaled.features[0][1].running_var[weakest] *= 100 ** 2
        torch.testing.assert_close(scaled(images), model(images), atol=1e-3, rtol=1e-3)
    after = {imp: group_scores(scaled, space, imp, batch)[stem] for imp in ("energy", "l1")}
    assert int(np.argmax(after["l1"])) == weakest
    np.testing.assert_allclose(after["energy"], before["energy"], rtol=1e-3)


def test_pruning_with_data_keeps_more_accuracy_than_weight_magnitude(cifar_dir):
    """The default with data (energy importance, layers refitted) against the weight-magnitude
    prune with BN re-estimated, on the trained fixture at 40% of its MACs, 500 test images."""
    from compress.data import sample_labelled
    data = f"cifar10:{cifar_dir}"
    model = compress.load(TRAINED).eval()
    images, labels = sample_labelled(data, False, 500, 32, model.card.mean, model.card.std, seed=1)

    def top1(settings):
        pruned = compress.stages.prune(model, settings, macs="40%", data=data)
        with torch.no_grad():
            return float((pruned.model(images).argmax(1) == labels).float().mean()), pruned

    magnitude, _ = top1(PruneSettings(importance="l1", reconstruct_images=0, recal_images=128))
    ours, pruned = top1(PruneSettings(reconstruct_images=128))
    assert pruned.restored == {"reconstructed_on": 128}
    assert ours > magnitude + 0.05, (ours, magnitude)


def test_a_pruned_checkpoint_prunes_again_and_reloads_exactly(tmp_path, cifar_dir):
    """Iterative pruning: a pruned net is pruned further within its own widths (refitted to
    its own outputs); the result is saved, rebuilt from its card and equal to the net in memory,
    its widths a config of the unpruned space whose analytic MACs equal the layer-by-layer count."""
    from compress.profile import count
    from compress.space import widths_of
    settings = PruneSettings(reconstruct_images=64)
    data = f"cifar10:{cifar_dir}"
    first = compress.stages.prune(compress.load(TRAINED), settings, macs="70%", output=tmp_path / "a.pt", data=data)
    second = compress.stages.prune(compress.load(tmp_path / "a.pt"), settings, macs="70%", output=tmp_path / "b.pt",
                                   data=data)
    assert second.macs_before == first.macs
    assert 0.68 * first.macs <= second.macs <= 0.70 * first.macs
    widths_a, widths_b = compress.load(tmp_path / "a.pt").card.config, second.model.card.config
    assert all(widths_b[g] <= widths_a[g] for g in widths_a) and widths_b != widths_a
    reloaded = compress.load(tmp_path / "b.pt").eval()
    space = ChannelSpace.from_model(reloaded, torch.randn(1, 3, 32, 32))
    assert widths_of(reloaded, space) == widths_b
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(reloaded(x), second.model.eval()(x), rtol=0, atol=0)
    parent = ChannelSpace.from_model(compress.load(TRAINED), torch.randn(1, 3, 32, 32))
    assert parent.macs(parent.validate(widths_b)) == second.macs == count(reloaded, 32)[0]
