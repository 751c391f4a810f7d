"""Architectures whose channels are tied in ways a plain conv chain's are not: grouped convs
(RegNet, ResNeXt), GroupNorm, concatenation of a layer with a transform of itself (GhostNet),
partial residual adds (ReXNet), split/chunk, and channel shuffle (ShuffleNetV2, pruned inside
its branches). Each prunes correctly or is refused with a CompressError that names the layer;
no raw exception reaches the user."""
import pytest
import torch
from torch import nn
from torchvision import models as tvm

from compress import ChannelSpace, CompressError, count, describe
from compress.pruning.prune import prune_target

from compress.pruning.prune import prune
from compress.pruning.space import widths_of

SIZE = 64


def _space(model):
    return ChannelSpace.from_model(model.eval(), torch.randn(1, 3, SIZE, SIZE))


def test_grouped_conv_input_pruned_as_the_same_positions_of_every_slice():
    """Pruning the 1x1 conv before a grouped conv equals zeroing the same per-slice positions
    of the grouped conv's weights in the unpruned net."""
    torch.manual_seed(0)
    model = tvm.regnet_y_400mf(num_classes=10).eval()
    space = _space(model)
    block = "trunk_output.block2.block2-0.f"
    grouped = model.get_submodule(f"{block}.b.0")
    group = space.by_name[f"{block}.a.0"]
    assert group.slices == grouped.groups > 1
    assert all(w % group.slices == 0 for w in group.widths) and len(group.widths) > 1
    width = group.widths[len(group.widths) // 2]
    pruned = prune(model, {**space.max(), group.name: width}, space, importance="first")

    masked = tvm.regnet_y_400mf(num_classes=10).eval()
    masked.load_state_dict(model.state_dict())
    with torch.no_grad():  # "first" keeps the first positions of each slice
        masked.get_submodule(f"{block}.b.0").weight[:, width // group.slices:] = 0
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), masked(x), atol=1e-5, rtol=1e-4)
    assert pruned.get_submodule(f"{block}.b.0").groups == grouped.groups


@pytest.mark.parametrize("build", [tvm.regnet_y_400mf, tvm.regnet_x_400mf, tvm.resnext50_32x4d],
                         ids=["regnet_y", "regnet_x", "resnext50"])
def test_grouped_conv_families_prune_to_half_the_macs_exactly_counted(build):
    torch.manual_seed(0)
    model = describe(build(num_classes=10), SIZE)
    pruned, info = prune_target(model, macs="50%", strategy="global")
    macs, params = count(pruned, SIZE)
    assert 0.47 <= macs / info["macs_before"] <= 0.50
    space = _space(model)
    assert (space.macs(pruned.card.config), space.params(pruned.card.config)) == (macs, params)
    assert widths_of(pruned, space) == pruned.card.config
    assert pruned(torch.randn(2, 3, SIZE, SIZE)).shape == (2, 10)


class GroupNormNet(nn.Module):
    """A detector-style head: GroupNorm after every conv, 8 groups."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 64, 3, padding=1), nn.GroupNorm(8, 64), nn.ReLU(),
            nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.GroupNorm(8, 128), nn.ReLU(),
            nn.Conv2d(128, 64, 3, padding=1), nn.GroupNorm(8, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


def test_groupnorm_widths_keep_every_group_the_same_size():
    torch.manual_seed(0)
    model = describe(GroupNormNet(), SIZE)
    pruned, info = prune_target(model, macs="50%", strategy="global")
    norms = [m for m in pruned.modules() if isinstance(m, nn.GroupNorm)]
    assert all(m.num_groups == 8 and m.num_channels % 8 == 0 and m.num_channels < full
               for m, full in zip(norms, (64, 128, 64)))
    assert count(pruned, SIZE)[0] <= info["target_macs"]
    assert pruned(torch.randn(2, 3, SIZE, SIZE)).shape == (2, 10)


class GhostNet(nn.Module):
    """Two ghost modules as GhostNet writes them: a 1x1 conv, a cheap depthwise transform of
    its output, both concatenated; the second is cut back to an odd width by a channel slice."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.primary = nn.Sequential(nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32), nn.ReLU())
        self.cheap = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.BatchNorm2d(32), nn.ReLU())
        self.primary2 = nn.Sequential(nn.Conv2d(64, 20, 1), nn.BatchNorm2d(20))
        self.cheap2 = nn.Sequential(nn.Conv2d(20, 20, 3, padding=1, groups=20), nn.BatchNorm2d(20))
        self.head = nn.Linear(36, 10)

    def forward(self, x):
        x = self.stem(x)
        a = self.primary(x)
        x = torch.cat([a, self.cheap(a)], 1)
        b = self.primary2(x)
        x = torch.cat([b, self.cheap2(b)], 1)[:, :36]
        return self.head(x.mean((2, 3)))


def test_ghost_modules_prune_through_the_concat_and_hold_the_sliced_one():
    torch.manual_seed(0)
    model = describe(GhostNet().eval(), SIZE)
    space = _space(model)
    ghost = space.by_name["primary.0"]  # the concat doubles it: 32 channels feed 64 inputs
    assert ghost.max == 32 and "primary2.0:in" in ghost.members
    assert "primary2.0" in space.held and "slice" in space.held["primary2.0"]
    config = {**space.max(), "primary.0": 16}
    pruned = prune(model, config, space, importance="first")
    assert pruned.primary2[0].in_channels == 32 and pruned.cheap[0].out_channels == 16
    assert count(pruned, SIZE)[0] == space.macs(config)
    assert pruned(torch.randn(2, 3, SIZE, SIZE)).shape == (2, 10)


class ChunkNet(nn.Module):
    """Gated units: a conv's output split in two halves by chunk()."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, padding=1)
        self.gate = nn.Conv2d(16, 24, 3, padding=1)
        self.head = nn.Linear(24, 10)

    def forward(self, x):
        a, b = self.conv(x).chunk(2, dim=1)
        return self.head(self.gate(a * torch.sigmoid(b)).mean((2, 3)))


def test_a_chunked_group_is_held_at_full_width_and_named():
    model = describe(ChunkNet().eval(), SIZE)
    space = _space(model)
    assert "conv" not in space.by_name and "chunk" in space.held["conv"]
    pruned, _ = prune_target(model, width=0.5)
    assert pruned.conv.out_channels == 32 and pruned.gate.out_channels == 16
    assert pruned(torch.randn(1, 3, SIZE, SIZE)).shape == (1, 10)


def test_shufflenet_prunes_inside_its_branches_and_holds_what_reaches_the_shuffle(caplog):
    """ShuffleNetV2: the groups that reach the channel shuffle (each block's output, the chunk
    before it) keep their width and are named; the channels inside each branch (1x1 -> depthwise
    -> 1x1) and the stem are free, and the net prunes to half its MACs, counted exactly; the
    user is told how many channels were held and how many were free."""
    import logging
    torch.manual_seed(0)
    model = describe(tvm.shufflenet_v2_x0_5(num_classes=10), SIZE)
    space = _space(model)
    assert any("reshape that moves them between dimensions" in why for why in space.held.values())
    assert any("split or chunk" in why for why in space.held.values())
    inner = [g for g in space.groups if g.name.endswith("branch2.0")]
    assert len(inner) == 16 and all(g.members[-1].endswith("branch2.5:in") for g in inner)  # one per block
    with caplog.at_level(logging.INFO, logger="compress"):
        pruned, info = prune_target(model, macs="50%", strategy="global")
    free = sum(g.max for g in space.groups)
    assert (f"{len(space.held)} channel group(s) ({space.held_channels} channels) stay at full width, "
            f"{len(space.groups)} ({free} channels) are free to prune: '{next(iter(space.held))}'") in caplog.text
    macs, params = count(pruned, SIZE)
    assert 0.47 <= macs / info["macs_before"] <= 0.50
    assert (space.macs(pruned.card.config), space.params(pruned.card.config)) == (macs, params)
    assert pruned(torch.randn(2, 3, SIZE, SIZE)).shape == (2, 10)


def test_a_shufflenet_branch_pruned_equals_its_cut_channels_silenced():
    """Pruning a branch's inner channels (keeping the first ones) gives the outputs of the
    unpruned net with those channels' weights into the branch's last 1x1 conv zeroed."""
    torch.manual_seed(0)
    model = tvm.shufflenet_v2_x0_5(num_classes=10).eval()
    space = _space(model)
    name = "stage3.1.branch2.0"
    width = space.by_name[name].widths[0]
    pruned = prune(model, {**space.max(), name: width}, space, importance="first")
    with torch.no_grad():
        model.get_submodule("stage3.1.branch2.5").weight[:, width:] = 0
        x = torch.randn(2, 3, SIZE, SIZE)
        torch.testing.assert_close(pruned(x), model(x), atol=1e-5, rtol=1e-4)
    assert pruned.get_submodule(name).out_channels == width


@pytest.mark.timeout(60)  # what it did before: torch-pruning's grouping ran on for minutes
def test_rexnet_partial_residuals_are_held_and_it_prunes_in_seconds():
    """timm's ReXNet adds each block's shortcut to the first channels of its output (x[:, :c] +=
    shortcut): the groups that reach that slice are held and named, the rest prune to half the
    MACs, counted exactly. torch-pruning's grouping alone ran for minutes on it."""
    import time
    import timm
    torch.manual_seed(0)
    model = describe(timm.create_model("rexnet_100", num_classes=10), SIZE)
    began = time.perf_counter()
    space = _space(model)
    assert time.perf_counter() - began < 30
    assert any("channel slice" in why for why in space.held.values()) and len(space.groups) > 10
    pruned, info = prune_target(model, macs="50%", strategy="global")
    macs, params = count(pruned, SIZE)
    assert 0.47 <= macs / info["macs_before"] <= 0.50
    assert (space.macs(pruned.card.config), space.params(pruned.card.config)) == (macs, params)
    assert pruned(torch.randn(2, 3, SIZE, SIZE)).shape == (2, 10)


def test_an_op_that_breaks_after_pruning_is_a_compress_error():
    """A forward that hard-codes a channel count torch-pruning cannot see."""

    class Hardcoded(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 32, 3, padding=1)
            self.head = nn.Linear(32, 10)

        def forward(self, x):
            x = self.conv(x)
            return self.head(x.view(x.shape[0], 32, SIZE, SIZE).mean((2, 3)))

    model = describe(Hardcoded().eval(), SIZE)
    with pytest.raises(CompressError, match="fails on its first forward pass.*conv 16/32"):
        prune_target(model, config={"conv": 16})


def test_a_long_step_without_progress_of_its_own_says_it_is_still_running(caplog):
    import logging
    import time
    from compress.logs import heartbeat
    with caplog.at_level(logging.INFO, logger="compress"), heartbeat("the dependency graph", every=0.05):
        time.sleep(0.2)
    beats = [r.message for r in caplog.records if "still running" in r.message]
    assert beats and all(m.startswith("the dependency graph: still running after") for m in beats)


class SharedHead(nn.Module):
    """A feature pyramid's head: one conv tower run on every level, as FCOS and RetinaNet do."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, stride=2, padding=1)
        self.down = nn.Conv2d(32, 32, 3, stride=2, padding=1)
        self.tower = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.ReLU())
        self.cls = nn.Conv2d(32, 5, 3, padding=1)

    def forward(self, x):
        p3 = self.stem(x)
        p4 = self.down(p3)
        return [self.cls(self.tower(level)) for level in (p3, p4)]


def test_a_head_shared_by_pyramid_levels_is_counted_once_per_level():
    torch.manual_seed(0)
    model = SharedHead().eval()
    space = _space(model)
    config = {g.name: g.widths[len(g.widths) // 2] for g in space.groups}
    pruned = prune(model, config, space)
    assert (space.macs(config), space.params(config)) == count(pruned, SIZE)
    assert space.macs(space.max()) == count(model, SIZE)[0]
