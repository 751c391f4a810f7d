import copy
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch import nn

import compress
from compress import CompressError
from compress.models import ZOO
from compress.pruning.graph import example_input
from compress.pruning.profile import count
from compress.pruning.importance import group_scores
from compress.pruning.prune import prune
from compress.pruning.space import ChannelSpace
from compress.supernet import PruningNet, Slimmable, Supernet, build_supernet, load_supernet, recalibrate_bn
from compress.supernet.pruningnet import pruningnet_step
from compress.supernet.slimmable import ordered_copy, reorder_channels, sandwich_step, soft_cross_entropy
from conftest import ROOT, ResidualNet, run_cli

BASE_MODELS = [n for n, e in ZOO.items() if not e.cifar and e.task == "classify"] + ["mobilenet_v2_cifar"]
SIZE = 32


def _model(name):
    torch.manual_seed(0)
    if name == "user":  # made for 16x16 inputs: the head flattens an 8x8 map
        model = ResidualNet()
        compress.describe(model, input_size=16, mean=[0.5] * 3, std=[0.5] * 3)
    else:
        model = compress.build(name, num_classes=10, input_size=SIZE)
    model.train()
    with torch.no_grad():  # BN statistics that are not the defaults
        model(torch.randn(8, 3, _size(model), _size(model)))
    return model.eval()


def _size(model):
    return model.card.input_size


def _batches(n=2, seed=1, size=SIZE):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 3, size, size, generator=g) for _ in range(n)]


@pytest.mark.slow
@pytest.mark.parametrize("name", BASE_MODELS + ["user"])
def test_slimmable_at_config_equals_extracted_model(name):
    model = _model(name)
    size = _size(model)
    space = ChannelSpace.from_model(model, example_input(size, model), min_ratio=0.25)
    supernet = Slimmable(model, space)
    x = torch.randn(3, 3, size, size)
    config = space.sample(np.random.default_rng(0))
    recalibrate_bn(supernet, config, _batches(size=size))
    net = supernet.extract(config)
    assert torch.allclose(net(x), supernet(x), atol=1e-5, rtol=0)
    assert count(net, size)[0] == space.macs(config)  # physically that small


def test_full_config_is_the_pretrained_model_and_reordering_keeps_its_function():
    model = _model("mobilenet_v2_cifar")
    x = torch.randn(4, 3, SIZE, SIZE)
    want = model(x)
    supernet = build_supernet(model, "slimmable")
    assert torch.equal(supernet.eval()(x), want)
    reorder_channels(supernet)
    assert torch.allclose(supernet(x), want, atol=1e-5)
    for name, scores in group_scores(supernet.plain_copy(), supernet.space, "l1").items():
        assert np.all(np.diff(scores) <= 1e-6), name  # most important channels first


@pytest.mark.slow
def test_ordered_by_the_pruning_ranking_a_width_slices_the_channels_prune_keeps():
    # a config searched on the supernet can then be cut from the pretrained model itself
    model = _model("mobilenet_v2_cifar")
    images = torch.randn(32, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    batch = (images, torch.arange(32) % 10)
    supernet = build_supernet(copy.deepcopy(model), "slimmable")
    reorder_channels(supernet, "energy", batch)
    space = ChannelSpace.from_model(model, example_input(SIZE, model))
    x = torch.randn(4, 3, SIZE, SIZE)
    # a PruningNet generates its weights, so it is fitted to a copy ordered the same way
    ordered = ordered_copy(model, "energy", batch)
    assert torch.allclose(ordered(x), model.eval()(x), atol=1e-5)
    pruningnet = build_supernet(ordered, "pruningnet", affine_bn=True)
    pruningnet.fit_pretrained()
    for seed in range(3):
        config = supernet.space.sample(np.random.default_rng(seed))
        cut = prune(model, config, space, importance="energy", batch=batch)
        assert torch.allclose(supernet.eval().extract(config)(x), cut(x), atol=1e-5), seed
        first = prune(pruningnet.plain_copy().eval(), config, space, importance="first")
        assert torch.allclose(first(x), cut(x), atol=1e-4), seed


@pytest.mark.slow
def test_bn_recalibration_equals_cumulative_statistics_of_the_extracted_model():
    model = _model("mobilenet_v2_cifar")
    space = ChannelSpace.from_model(model, example_input(SIZE, model))
    supernet = Slimmable(model, space)
    config = space.sample(np.random.default_rng(3))
    net = supernet.extract(config)
    for m in net.modules():  # the textbook way: reset, cumulative average, train-mode passes
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    net.train()
    with torch.no_grad():
        for b in _batches(3):
            net(b)
    recalibrate_bn(supernet, config, _batches(3))
    mine = supernet.extract(config)
    assert not supernet.training
    for (name, a), b in zip(net.named_buffers(), mine.buffers()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), name


@pytest.mark.slow
@pytest.mark.parametrize("name", BASE_MODELS)
def test_one_sandwich_step_trains_every_width(name):
    model = _model(name)
    supernet = build_supernet(model, "slimmable", min_width=0.35).train()
    bns = [m for m in supernet.modules() if isinstance(m, nn.BatchNorm2d)]
    tracked = [int(m.num_batches_tracked) for m in bns]
    before = {k: v.clone() for k, v in supernet.state_dict().items()}
    opt = torch.optim.SGD(supernet.parameters(), lr=0.1)
    loss = sandwich_step(supernet, num_random=2)(supernet, torch.randn(4, 3, SIZE, SIZE), torch.arange(4),
                                                 lambda l: l.backward())
    opt.step()
    assert torch.isfinite(loss)
    assert [int(m.num_batches_tracked) for m in bns] == [t + 1 for t in tracked]  # from the max config only
    assert supernet.config == supernet.space.max()
    changed = [k for k, v in supernet.state_dict().items() if k.endswith("weight") and not torch.equal(v, before[k])]
    assert len(changed) == sum(1 for k in before if k.endswith("weight"))


def test_from_a_pretrained_model_every_width_learns_from_the_frozen_model():
    # labels and in-place targets pull a pretrained supernet's shared weights away from what
    # it knew; the pretrained model's own outputs are what every width, the max one too, should match
    model = _model(BASE_MODELS[0])
    teacher = copy.deepcopy(model).eval()
    supernet = build_supernet(model, "slimmable", min_width=0.35, affine_bn=True).train()
    images, labels = torch.randn(4, 3, SIZE, SIZE), torch.arange(4)
    with torch.no_grad():
        target = teacher(images).softmax(1)
        expected = {}
        for name, config in (("max", supernet.space.max()), ("min", supernet.space.min())):
            supernet.set_config(config, track=False)
            expected[name] = float(soft_cross_entropy(supernet(images), target))
    losses = []
    step = sandwich_step(supernet, num_random=0, teacher=teacher)
    main = step(supernet, images, labels, lambda loss: losses.append(float(loss.detach()) * 2))  # averaged over 2
    assert float(main) == pytest.approx(expected["max"], rel=1e-5)
    assert losses == pytest.approx([expected["max"], expected["min"]], rel=1e-5)
    assert all(not p.requires_grad for p in teacher.parameters())
    inplace = sandwich_step(supernet, num_random=0)(supernet, images, labels, lambda loss: None)
    assert abs(float(inplace) - expected["max"]) > 1e-3  # without the teacher: the labels


@pytest.mark.parametrize("name", BASE_MODELS)
def test_pruningnet_hypernetworks_generate_each_layer_and_extract_matches(name):
    model = _model(name)
    supernet = build_supernet(model, "pruningnet", hidden=8)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert set(supernet._layers.values()) == set(layers)
    for key, hyper in supernet.hypers.items():
        layer = layers[supernet._layers[key]]
        assert dict(hyper.shapes) == {n: p.shape for n, p in layer.named_parameters(recurse=False)}
        assert hyper.fc1.out_features == 8
    config = supernet.space.sample(np.random.default_rng(1))
    recalibrate_bn(supernet, config, _batches())
    x = torch.randn(3, 3, SIZE, SIZE)
    net = supernet.extract(config)
    assert torch.allclose(net(x), supernet(x), atol=1e-5, rtol=0)
    supernet.train()
    loss = pruningnet_step(supernet)(supernet, x, torch.arange(3), lambda l: l.backward())
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in supernet.hypers.parameters())


def test_pruningnet_extract_brings_blown_up_convs_back_to_init_scale():
    """Training grows generated weights far past their initial scale, which stalls
    fine-tuning (SGD's effective step is lr / |w|^2); extract rescales each conv feeding a
    BN to He-init scale, BN statistics with it, and leaves the function as it was."""
    model = _model("user")
    supernet = build_supernet(model, "pruningnet", hidden=8)
    with torch.no_grad():
        for hyper in supernet.hypers.values():
            hyper.fc2.weight.mul_(30)
            hyper.fc2.bias.mul_(30)
    config = supernet.space.sample(np.random.default_rng(2))
    recalibrate_bn(supernet, config, _batches(size=16))
    x = torch.randn(3, 3, 16, 16)
    want = supernet(x)
    net = supernet.extract(config)
    assert torch.allclose(net(x), want, atol=1e-6 * want.abs().max().item(), rtol=0)
    unscaled = Supernet.extract(supernet, config)
    for name in ("stem.0", "body.0", "body.3"):  # each feeds only a BN
        w = net.get_submodule(name).weight
        he = (2 / (w.shape[0] * w[0, 0].numel())) ** 0.5
        assert he <= w.pow(2).mean().sqrt() < 2 * he, name  # factors are powers of two
        assert unscaled.get_submodule(name).weight.pow(2).mean().sqrt() > 5 * he, name
    for name in ("down.0", "head"):  # no BN after them: their scale is part of the function
        assert torch.equal(net.get_submodule(name).weight, unscaled.get_submodule(name).weight), name


def test_pruningnet_fitted_to_pretrained_weights_reproduces_the_model():
    model = _model("mobilenet_v2_cifar")
    x = torch.randn(4, 3, SIZE, SIZE)
    want = model(x)
    supernet = build_supernet(model, "pruningnet", affine_bn=True)
    supernet.fit_pretrained()
    assert torch.allclose(supernet.eval()(x), want, atol=1e-4)
    assert torch.allclose(supernet.extract(supernet.space.max())(x), want, atol=1e-4)


def test_supernet_checkpoint_round_trip(tmp_path):
    supernet = build_supernet(_model("mobilenet_v3_small"), "pruningnet", hidden=4)
    compress.supernet.save_supernet(tmp_path / "s.pt", supernet, {"data": "synthetic:8", "count": 4, "seed": 0})
    loaded, record = load_supernet(tmp_path / "s.pt")
    assert isinstance(loaded, PruningNet) and record["method"] == "pruningnet" and loaded.hidden == 4
    for (k, a), b in zip(supernet.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    compress.save_checkpoint(tmp_path / "plain.pt", _model("mobilenet_v3_small"))
    with pytest.raises(CompressError, match="not a supernet checkpoint"):
        load_supernet(tmp_path / "plain.pt")


def test_bad_supernet_input_is_named():
    pruned = compress.prune(compress.build("mobilenet_v3_small_cifar"), width=0.5).model
    with pytest.raises(CompressError, match="already pruned"):
        build_supernet(pruned, "slimmable")
    with pytest.raises(CompressError, match="`min_width` must be in"):
        build_supernet(compress.build("mobilenet_v3_small_cifar"), "slimmable", min_width=1.5)
    supernet = build_supernet(compress.build("mobilenet_v3_small_cifar"), "slimmable")
    with pytest.raises(CompressError, match="not allowed for group"):
        supernet.set_config({**supernet.space.max(), "features.0.0": 3})
    with pytest.raises(CompressError, match="unknown group"):
        supernet.set_config({"nope": 8})


TINY = ["--input-size", "16", "--data", "synthetic:320", "--holdout", "32", "--batch-size", "16", "--val-images", "16",
        "--workers", "0", "--recal-images", "16", "--eval-images", "16", "--quiet"]


@pytest.mark.slow
def test_supernet_cli_sigkill_then_resume_equals_uninterrupted(tmp_path):
    args = ["supernet", "mobilenet_v3_small_cifar", "--method", "slimmable", *TINY, "--epochs", "2", "--seed", "2",
            "--deterministic", "--steps-per-epoch", "8"]
    full = run_cli(*args, "--out", tmp_path / "full", fresh=True)
    assert full.returncode == 0, full.stderr
    assert "max config" in full.stdout and "min config" in full.stdout
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "compress", *args, "--out", str(run)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().strip()):
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "supernet.pt").exists()
    resumed = run_cli("supernet", "--resume", run, "--quiet", fresh=True)
    assert resumed.returncode == 0, resumed.stderr
    assert [json.loads(x)["epoch"] for x in metrics.read_text().splitlines()] == [1, 2]
    a = torch.load(tmp_path / "full" / "supernet.pt", weights_only=True)["state_dict"]
    b = torch.load(run / "supernet.pt", weights_only=True)["state_dict"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
