"""Model sources: torchvision:NAME, timm:NAME, file.py:factory and package.module:factory,
wherever a model is named (CLI, Python), recorded in the card so a checkpoint rebuilds."""
import os
from pathlib import Path

import pytest
import torch
from torchvision import models as tvm

import compress
from compress import CompressError
from conftest import run_cli

SIZE = 64


def _same_outputs(a, b):
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("source,classes", [("torchvision:resnet50", 1000), ("timm:efficientnet_lite0", 1000)])
def test_cli_prunes_a_source_to_half_its_macs_and_the_checkpoint_rebuilds(tmp_path, source, classes):
    out = tmp_path / "pruned.pt"
    done = run_cli("prune", source, "--macs", "50%", "--input-size", SIZE, "-o", out)
    assert done.returncode == 0, done.stderr
    model = compress.load(out)
    assert model.card.arch["zoo"] == source and model.card.num_classes == classes
    base = compress.build(source, input_size=SIZE)
    macs, _ = compress.count(model, SIZE)
    assert 0.47 <= macs / compress.count(base, SIZE)[0] <= 0.50
    assert model(torch.randn(1, 3, SIZE, SIZE)).shape == (1, classes)


def test_torchvision_source_records_the_builders_defaults_and_loads_local_weights(tmp_path):
    card = compress.build("torchvision:efficientnet_b3").card
    assert (card.input_size, card.num_classes) == (300, 1000)  # the weights' own crop size
    torch.manual_seed(0)
    trained = tvm.resnet18(num_classes=10)
    torch.save(trained.state_dict(), tmp_path / "resnet18.pth")
    model = compress.build("torchvision:resnet18", num_classes=10, pretrained=str(tmp_path / "resnet18.pth"))
    _same_outputs(model, trained)


FACTORY = '''
from torch import nn


def small(num_classes=10):
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))
'''


def test_a_users_factory_file_is_a_source_and_its_checkpoint_needs_trust(tmp_path):
    (tmp_path / "nets.py").write_text(FACTORY)
    done = run_cli("prune", "nets.py:small", "--num-classes", 7, "--input-size", 32, "--width", 0.5, "-o",
                   tmp_path / "small.pt", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    refused = run_cli("profile", tmp_path / "small.pt", cwd=tmp_path)
    assert refused.returncode == 2 and "--trust-code" in refused.stderr and "nets.py:small" in refused.stderr
    with pytest.raises(CompressError, match="trust_code=True"):
        compress.load(tmp_path / "small.pt")
    trusted = run_cli("profile", tmp_path / "small.pt", "--trust-code", cwd=tmp_path)
    assert trusted.returncode == 0 and "7 classes" in trusted.stdout
    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        model = compress.load("small.pt", trust_code=True)
    finally:
        os.chdir(here)
    assert [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)] == [16, 32]


def test_a_package_factory_is_a_source():
    model = compress.build("torchvision.models:mobilenet_v3_small", num_classes=5)
    assert model.card.num_classes == 5 and model.card.arch["zoo"] == "torchvision.models:mobilenet_v3_small"
    pruned = compress.prune(model, width=0.5).model
    assert pruned(torch.randn(1, 3, SIZE, SIZE)).shape == (1, 5)


@pytest.mark.parametrize("name,message", [
    ("torchvision:resnet05", "did you mean 'torchvision:resnet50'"),
    ("timm:efficientnet_lite9", "timm has no model 'efficientnet_lite9'"),
    ("missing.py:build", "the file 'missing.py' does not exist"),
    ("torchvision.models:resnet_fifty", "has no function 'resnet_fifty'"),
    ("nosuchpackage.models:build", "cannot import 'nosuchpackage.models'"),
    ("mobilenet_v9", "torchvision:resnet50, timm:efficientnet_lite0"),
])
def test_bad_sources_name_what_to_fix(name, message):
    done = run_cli("profile", name)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


IMAGENET_V2 = Path(__file__).resolve().parents[2].parent / "shared" / "pretrained" / "mobilenet_v2_imagenet.pth"


def test_imagenet_classifier_weights_fill_a_detectors_backbone(tmp_path):
    """The ImageNet MobileNetV2 fills fcos_mobilenet_v2's backbone.body (as torchvision's
    weights_backbone does), the FPN and head stay initialized; a ResNet's weights fill a
    RetinaNet's body the same way, and weights that are neither are refused."""
    torch.manual_seed(0)
    fresh = compress.build("fcos_mobilenet_v2", num_classes=4, input_size=SIZE)
    torch.manual_seed(0)
    model = compress.build("fcos_mobilenet_v2", num_classes=4, input_size=SIZE, pretrained=str(IMAGENET_V2))
    imagenet = torch.load(IMAGENET_V2, weights_only=True)
    state, before = model.state_dict(), fresh.state_dict()
    body = [k for k in state if k.startswith("backbone.body.")]
    assert len(body) == len([k for k in imagenet if k.startswith("features.")])
    assert all(torch.equal(state[k], imagenet["features." + k.removeprefix("backbone.body.")]) for k in body)
    assert all(torch.equal(state[k], before[k]) for k in state if not k.startswith("backbone.body."))
    torch.save(tvm.resnet18().state_dict(), tmp_path / "resnet18.pth")
    retina = compress.build("torchvision:retinanet_resnet50_fpn", num_classes=4, input_size=SIZE)
    with pytest.raises(CompressError, match="do not fit the model"):  # resnet18 blocks are not resnet50's
        compress.build("torchvision:retinanet_resnet50_fpn", num_classes=4, input_size=SIZE,
                       pretrained=str(tmp_path / "resnet18.pth"))
    torch.save({k.removeprefix("backbone.body."): v for k, v in retina.state_dict().items()
                if k.startswith("backbone.body.")}, tmp_path / "resnet50_body.pth")
    loaded = compress.build("torchvision:retinanet_resnet50_fpn", num_classes=4, input_size=SIZE,
                            pretrained=str(tmp_path / "resnet50_body.pth"))
    conv1 = "backbone.body.conv1.weight"
    assert torch.equal(loaded.state_dict()[conv1], retina.state_dict()[conv1])
