import logging
import os

import pytest
import torch
import torchvision

import compress
from compress import CompressError
from compress.checkpoint import load_target, save_checkpoint
from compress.files import safe_torch_load
from compress.logs import notes
from compress.models import build
from compress.pruning.prune import prune, prune_target
from compress.pruning.space import widths_of
from compress.pruning.space import ChannelSpace


def test_round_trip_gives_identical_outputs_and_loads_weights_only(tmp_path):
    torch.manual_seed(0)
    model = build("mobilenet_v3_small_cifar")
    pruned, _ = prune_target(model, macs="40%", strategy="global")
    pruned.eval()
    path = tmp_path / "net.pt"
    record = save_checkpoint(path, pruned, provenance={"created_by": "test", "parent": "mobilenet_v3_small_cifar"})
    raw = torch.load(path, weights_only=True)  # plain data and tensors only
    assert raw["config"] == pruned.card.config and raw["num_classes"] == 10
    assert raw["macs"] == record["macs"] and raw["provenance"]["parent"] == "mobilenet_v3_small_cifar"
    loaded = compress.load(path).eval()
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(loaded(x), pruned(x), atol=0, rtol=0)
    assert loaded.card.input_size == 32
    assert not [p for p in os.listdir(tmp_path) if p != "net.pt"]  # no temp files left behind


def test_truncated_corrupt_and_foreign_files_are_named(tmp_path):
    model = build("mobilenet_v2_cifar")
    path = tmp_path / "good.pt"
    save_checkpoint(path, model)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CompressError, match="truncated.pt.*truncated, corrupt"):
        compress.load(truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CompressError, match="garbage.pt"):
        compress.load(garbage)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(CompressError, match="not a compress checkpoint"):
        compress.load(foreign)
    pickled = tmp_path / "pickled.pt"
    torch.save(model, pickled)  # a whole pickled module: code, refused
    with pytest.raises(CompressError, match="pickled Python objects"):
        safe_torch_load(pickled)
    with pytest.raises(CompressError, match="does not exist"):
        compress.load(tmp_path / "missing.pt")


def test_pretrained_local_torchvision_state_dict(tmp_path):
    torch.manual_seed(1)
    reference = torchvision.models.mobilenet_v2(num_classes=1000)
    path = tmp_path / "mobilenet_v2.pth"
    torch.save(reference.state_dict(), path)
    model = load_target("mobilenet_v2", pretrained=str(path)).eval()
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(model(x), reference.eval()(x))


def test_pretrained_with_other_class_count_keeps_backbone(tmp_path, caplog):
    reference = torchvision.models.mobilenet_v2(num_classes=1000)
    path = tmp_path / "mobilenet_v2.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in reference.state_dict().items()}}, path)
    notes.addHandler(caplog.handler)  # the notes logger does not propagate once the CLI shows it
    try:
        with caplog.at_level(logging.INFO, logger="compress"):
            model = load_target("mobilenet_v2_cifar", num_classes=10, pretrained=str(path))
    finally:
        notes.removeHandler(caplog.handler)
    assert "new classifier head 'classifier.1' for 10 classes (the weights have 1000)" in caplog.text
    torch.testing.assert_close(model.features[3].conv[0][0].weight, reference.features[3].conv[0][0].weight)
    assert model.classifier[1].out_features == 10


def test_pretrained_that_does_not_fit_lists_keys(tmp_path):
    path = tmp_path / "v3.pth"
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), path)
    with pytest.raises(CompressError, match="do not fit the model: missing keys: .*unexpected keys"):
        load_target("mobilenet_v2", pretrained=str(path))


def test_torchvision_weights_offline_name_url_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")  # make sure nothing is fetched
    with pytest.raises(CompressError, match=r"mobilenet_v2-b0353104\.pth.*put it at .*checkpoints"):
        load_target("mobilenet_v2", pretrained="torchvision")


def test_torchvision_weights_from_cache_file(tmp_path, monkeypatch):
    """With the file in torch's hub cache (as a user puts it offline), the real loading path runs."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    reference = torchvision.models.mobilenet_v3_small()
    weights = torchvision.models.MobileNet_V3_Small_Weights.IMAGENET1K_V1
    cache = tmp_path / "hub" / "checkpoints" / os.path.basename(weights.url)
    cache.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), cache)
    model = load_target("mobilenet_v3_small", pretrained="torchvision").eval()
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(model(x), reference.eval()(x))


def test_user_cnn_through_space_prune_checkpoint_load(tmp_path, user_net):
    x = torch.randn(2, 3, 16, 16)
    space = ChannelSpace.from_model(user_net, torch.randn(1, 3, 16, 16))
    names = [g.name for g in space.groups]
    assert names == ["stem.0", "body.0", "down.0"]  # stem and body.3 tied by the residual
    config = space.validate({"stem.0": 8, "body.0": 16, "down.0": 8})
    pruned = prune(user_net, config, space)
    assert widths_of(pruned, space) == config
    assert pruned.head.in_features == 8 * 8 * 8  # flatten expands the group 64x
    assert (space.macs(config), space.params(config)) == compress.count(pruned, 16)
    pruned.card = compress.describe(user_net, input_size=16, mean=[0.5] * 3, std=[0.5] * 3).card.replace(
        config=config.to_dict(), space=space.settings())
    save_checkpoint(tmp_path / "user.pt", pruned)
    with pytest.raises(CompressError, match="pass the unpruned model"):
        compress.load(tmp_path / "user.pt")
    from conftest import ResidualNet
    loaded = compress.load(tmp_path / "user.pt", model=ResidualNet()).eval()
    torch.testing.assert_close(loaded(x), pruned(x), atol=0, rtol=0)
