"""compress.compress: a user's own CNN compressed from DataLoaders in one call."""
import re

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import compress
from compress import CompressError, FinetuneSettings, SearchSettings, SupernetSettings
from compress.training.evaluate import evaluate
from compress.pruning.space import widths_of
from conftest import ROOT, ResidualNet, TRAINED, run_cli


def _loaders(cifar_dir, n_train=256, n_val=128):
    """Real CIFAR-10 images, cut to 16x16 (what ResidualNet's head expects), as plain tensors."""
    with np.load(cifar_dir / "train.npz") as f:
        pick = np.random.default_rng(0).permutation(len(f["y"]))[:n_train + n_val]
        x = torch.from_numpy(f["x"][pick]).permute(0, 3, 1, 2).float().div(255)[:, :, ::2, ::2].contiguous()
        y = torch.from_numpy(f["y"][pick].astype(np.int64))
    x = (x - 0.5) / 0.25
    train = DataLoader(TensorDataset(x[:n_train], y[:n_train]), batch_size=32, shuffle=True)
    val = DataLoader(TensorDataset(x[n_train:], y[n_train:]), batch_size=64)
    return train, val


def test_one_call_prunes_a_user_cnn_to_the_budget_and_recovers(tmp_path, cifar_dir):
    torch.manual_seed(0)
    net = ResidualNet()
    train, val = _loaders(cifar_dir)
    small, report = compress.compress(net, torch.randn(1, 3, 16, 16), {"macs": "50%"}, train, val,
                                      method="global", finetune=FinetuneSettings(epochs=2, block_steps=5), out=tmp_path / "run")
    macs, params = compress.count(small, 16)
    full, _ = compress.count(net, 16)
    assert (report.macs, report.params) == (macs, params) and report.macs_before == full
    space = compress.ChannelSpace.from_model(net, torch.randn(1, 3, 16, 16))
    assert widths_of(small, space) == report.config == small.card.config
    assert macs <= full // 2  # and as close under it as this space's widths allow: one notch more is over
    for g in space.groups:
        wider = [w for w in g.widths if w > report.config[g.name]]
        assert not wider or space.macs({**report.config, g.name: wider[0]}) > full // 2
    assert small.card.arch == {"user": "ResidualNet"} and small.card.num_classes == 10
    assert [h["epoch"] for h in report.history] == [1, 2]
    assert all(0 <= v <= 1 for v in (report.before, report.pruned, report.after))
    assert report.after == evaluate(small, val)["top1"]  # the state keep-best returned, on the user's val loader
    compress.save_checkpoint(tmp_path / "small.pt", small)
    again = compress.load(tmp_path / "small.pt", model=ResidualNet()).eval()
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(again(x), small(x), atol=0, rtol=0)


def test_one_call_supernet_search_meets_a_params_budget(tmp_path, cifar_dir):
    torch.manual_seed(0)
    net = ResidualNet()
    train, val = _loaders(cifar_dir, 128, 64)
    small, report = compress.compress(
        net, torch.randn(1, 3, 16, 16), {"macs": "70%", "params": "60%"}, train, val, method="slimmable",
        supernet=SupernetSettings(epochs=1, steps_per_epoch=3),
        search=SearchSettings(method="random", samples=4, recal_images=32, eval_images=32),
        finetune=FinetuneSettings(epochs=0), out=tmp_path / "run")
    full_macs, full_params = compress.count(net, 16)
    assert compress.count(small, 16) == (report.macs, report.params)
    assert report.macs <= 0.7 * full_macs and report.params <= 0.6 * full_params
    assert report.after is None and report.history == []  # no recovery asked for


def test_one_call_bad_input_is_named(cifar_dir):
    net = ResidualNet()
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(CompressError, match="unknown method 'fastnas'"):
        compress.compress(net, x, {"macs": "50%"}, method="fastnas")
    with pytest.raises(CompressError, match="constraints take 'macs', 'params' .* and 'latency'"):
        compress.compress(net, x, {"flops": "50%"})
    with pytest.raises(CompressError, match="square image batch"):
        compress.compress(net, torch.randn(1, 3, 16, 12), {"macs": "50%"})
    with pytest.raises(CompressError, match="smallest config of this space"):
        compress.compress(net, x, {"macs": "1%"})


def test_the_readme_example_runs(tmp_path, monkeypatch):
    """The README's one-call example, run as written."""
    text = (ROOT / "README.md").read_text()
    code = next(block for block in re.findall(r"```python\n(.*?)```", text, re.S) if "compress.compress(" in block)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    assert (tmp_path / "small.pt").is_file()


def test_one_call_takes_a_segmenter_its_loaders_and_the_users_loss(tmp_path):
    """A segmentation model of the user's (per-pixel logits in a dict), DataLoaders of masks, and
    the user's own loss for the recovery: mIoU before and after, fidelity to the original."""
    from torch.utils.data import DataLoader
    from compress.data.specs import split
    torch.manual_seed(0)

    class Seg(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.BatchNorm2d(32),
                                            torch.nn.ReLU(), torch.nn.Conv2d(32, 32, 3, padding=1),
                                            torch.nn.BatchNorm2d(32), torch.nn.ReLU())
            self.out = torch.nn.Conv2d(32, 4, 1)

        def forward(self, x):
            return {"out": self.out(self.body(x))}

    def make(train):
        return DataLoader(split("shapes:64", train, 32, (0.5,) * 3, (0.25,) * 3), batch_size=8, shuffle=train)
    calls = []

    def loss(outputs, masks):
        calls.append(1)
        return torch.nn.functional.cross_entropy(outputs["out"], masks)
    small, report = compress.compress(Seg(), torch.randn(1, 3, 32, 32), {"macs": "50%"}, make(True), make(False),
                                      finetune=FinetuneSettings(epochs=1, steps_per_epoch=2, holdout=8), loss=loss,
                                      out=tmp_path / "run")
    assert small.card.task == "segment" and report.metric == "miou" and calls
    assert all(0 <= v <= 1 for v in (report.before, report.pruned, report.after, report.fidelity))


@pytest.mark.slow
def test_one_call_and_the_recipe_runner_prune_the_same_net(tmp_path, cifar_dir):
    """compress.compress and `chansearch run` are front ends over the same prune stage: from the
    same trained model, the same images and the same settings, the same channels and the same
    weights, to the bit."""
    from compress.data.specs import sample_labelled
    source = TRAINED
    spec = f"cifar10:{cifar_dir}"
    recipe = tmp_path / "same.yaml"
    recipe.write_text(f"name: same\nout: {tmp_path / 'runs'}\nmodel: {{name: {source}}}\n"
                      f"data: {{spec: '{spec}', batch_size: 32, workers: 0}}\nsupernet: {{method: none}}\n"
                      "prune: {targets: [{macs: 50%}]}\nfinetune: {epochs: 0, val_images: 32}\n"
                      "export: {formats: []}\n")
    out = run_cli("run", recipe, "--quiet")
    assert out.returncode == 0, out.stderr[-3000:]
    ran = compress.load(tmp_path / "runs" / "same" / "prune" / "macs50pct.pt")

    model = compress.load(source)
    card = model.card
    # the images the prune stage measures and refits on, in its order, as the user's own loader
    images, labels = sample_labelled(spec, True, 512, card.input_size, card.mean, card.std, seed=0)
    train = DataLoader(TensorDataset(images, labels), batch_size=32)
    small, report = compress.compress(model, torch.zeros(1, 3, card.input_size, card.input_size), {"macs": "50%"},
                                      train, finetune=FinetuneSettings(epochs=0), out=tmp_path / "one")
    assert small.card.config == ran.card.config == report.config
    assert small.state_dict().keys() == ran.state_dict().keys()
    for (name, a), b in zip(small.state_dict().items(), ran.state_dict().values()):
        assert torch.equal(a, b), name


def test_the_direct_path_meets_macs_and_params_budgets_together(tmp_path):
    """One prune entry point takes several budgets: the net meets both, and the tighter one is
    met as closely as the space's widths allow."""
    model = compress.build("mobilenet_v2_cifar", width_mult=0.5)
    full_macs, full_params = compress.count(model, 32)
    both = compress.prune(model, macs="60%", params="40%")
    assert both.macs <= 0.6 * full_macs and both.params <= 0.4 * full_params
    assert (both.macs, both.params) == compress.count(both.model, 32)
    alone = compress.prune(model, params="40%")
    assert alone.params <= 0.4 * full_params and alone.params > 0.37 * full_params
    with pytest.raises(CompressError, match="no config can meet params <= 1.00K: it is below the smallest config"):
        compress.prune(model, params=1000)
