import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import compress
from compress import CompressError
from compress.settings import DataSettings, TrainSettings
from compress.training.tasks import softened_kl as kd_loss
from compress.training.loop import fit
from compress.training.optim import lr_lambda, param_groups
from conftest import ROOT, TRAINED, run_cli

TINY = ["--input-size", "16", "--data", "synthetic:96", "--batch-size", "16", "--val-images", "32", "--workers", "0",
        "--lr", "0.05", "--seed", "3", "--quiet"]


def _weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


def test_train_writes_run_folder_and_checkpoint(tmp_path):
    out = run_cli("train", "mobilenet_v3_small_cifar", *TINY, "--epochs", "2", "--holdout", "16",
                  "--out", tmp_path / "run")
    assert out.returncode == 0, out.stderr
    run = tmp_path / "run"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert all(np.isfinite(m["train_loss"]) and 0 <= m["val_top1"] <= 1 for m in metrics)
    assert metrics[1]["lr"] == pytest.approx(0.0)  # cosine ends at zero
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))  # one file per epoch's scalars
    held = json.loads((run / "holdout.json").read_text())
    assert len(held["indices"]) == 16 and held["seed"] == 3
    model = compress.load(run / "model.pt")
    assert model.card.provenance["created_by"] == "chansearch train"
    again = run_cli("train", "mobilenet_v3_small_cifar", *TINY, "--epochs", "2", "--out", run)
    assert again.returncode == 2 and "--resume" in again.stderr  # never overwrites a run


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
    args = ["train", "mobilenet_v3_small_cifar", "--input-size", "16", "--data", "synthetic:320", "--batch-size", "16",
            "--val-images", "16", "--workers", "0", "--epochs", "3", "--seed", "1", "--deterministic",
            "--quiet", "--ema-decay", "0.9"]
    full = run_cli(*args, "--out", tmp_path / "full", fresh=True)
    assert full.returncode == 0, full.stderr

    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "compress", *args, "--out", str(run)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().strip()):
        time.sleep(0.05)
    time.sleep(0.5)  # into the second epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert len(done) in (1, 2)  # killed mid-run, completed epochs kept
    assert not (run / "model.pt").exists()
    saved = torch.load(run / "last.pt", weights_only=True)
    assert saved["epoch"] + 1 == len(done)

    resumed = run_cli("train", "--resume", run, "--quiet", fresh=True)
    assert resumed.returncode == 0, resumed.stderr
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2, 3]
    a, b = _weights(tmp_path / "full" / "model.pt"), _weights(run / "model.pt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bit-exact


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path):
    common = ["train", "mobilenet_v3_small_cifar", "--input-size", "16", "--data", "synthetic:64", "--batch-size", "16",
              "--val-images", "32", "--workers", "0", "--epochs", "2", "--lr", "0.01", "--seed", "0",
              "--quiet"]
    one = run_cli(*common, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "compress", *common, "--out", str(tmp_path / "two")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    m1 = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len(m1) == len(m2) == 2
    for a, b in zip(m1, m2):
        # same images, same global batch; BN sees 8 images per process instead of 16
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=0.05)
        assert b["val_images"] == a["val_images"] == 32
    assert (tmp_path / "two" / "model.pt").is_file()


def test_finetune_with_distillation_records_parent(tmp_path):
    pruned = compress.prune(compress.build("mobilenet_v3_small_cifar"), width=0.5).model
    compress.save_checkpoint(tmp_path / "p.pt", pruned)
    out = run_cli("finetune", tmp_path / "p.pt", *TINY, "--epochs", "1", "--teacher", "mobilenet_v3_small_cifar",
                  "--kd-weight", "0.7", "--block-steps", "2", "-o", tmp_path / "ft.pt")
    assert out.returncode == 0, out.stderr
    tuned = compress.load(tmp_path / "ft.pt")
    assert tuned.card.config == pruned.card.config  # architecture kept
    record = torch.load(tmp_path / "ft.pt", weights_only=True)
    assert record["provenance"]["parent"] == str(tmp_path / "p.pt")
    assert record["provenance"]["teacher"] == "mobilenet_v3_small_cifar"
    assert (tmp_path / "ft_run" / "metrics.jsonl").is_file()


def test_from_scratch_retrains_the_architecture_not_the_weights(tmp_path):
    pruned = compress.prune(compress.build("mobilenet_v3_small_cifar"), width=0.5).model
    with torch.no_grad():
        for p in pruned.parameters():
            p.fill_(0.5)  # trained weights no initialisation produces
    compress.save_checkpoint(tmp_path / "p.pt", pruned)
    torch.manual_seed(7)
    fresh = compress.load(tmp_path / "p.pt", weights=False)
    torch.manual_seed(7)
    want = compress.prune(compress.build("mobilenet_v3_small_cifar"), compress.PruneSettings(importance="first"),
                          config=pruned.card.config).model
    assert fresh.card.config == pruned.card.config
    for (name, a), b in zip(fresh.state_dict().items(), want.state_dict().values()):
        assert torch.equal(a, b), name  # the architecture's own initialisation, cut to the config
    out = run_cli("train", tmp_path / "p.pt", "--from-scratch", *TINY, "--epochs", "1", "--out", tmp_path / "r")
    assert out.returncode == 0, out.stderr
    record = torch.load(tmp_path / "r" / "model.pt", weights_only=True)
    assert record["config"] == pruned.card.config and record["provenance"]["from_scratch"]
    assert not (record["state_dict"]["classifier.3.weight"] - 0.5).abs().lt(0.1).all()
    zoo = run_cli("train", "mobilenet_v3_small_cifar", "--from-scratch", *TINY, "--out", tmp_path / "z")
    assert zoo.returncode == 2 and "--from-scratch" in zoo.stderr and "Traceback" not in zoo.stderr


def test_divergence_names_step_and_checkpoint(tmp_path):
    model = compress.build("mobilenet_v3_small_cifar")
    calls = {"n": 0}

    def step(net, images, labels, backward):
        calls["n"] += 1
        loss = torch.nn.functional.cross_entropy(net(images), labels)
        if calls["n"] == 9:  # the 3rd step of the 2nd epoch
            loss = loss * float("nan")
        backward(loss)
        return loss.detach()

    cfg = TrainSettings(epochs=3, val_images=16, steps_per_epoch=6)
    with pytest.raises(CompressError, match=r"diverged.*epoch 2, step 3.*last\.pt \(after epoch 1\)"):
        fit(model, DataSettings(spec="synthetic:96", batch_size=16, workers=0), cfg, tmp_path / "run", step=step,
            quiet=True)


def test_kd_loss_zero_for_identical_logits_and_positive_otherwise():
    logits = torch.randn(8, 10)
    assert kd_loss(logits, logits, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(logits, torch.randn(8, 10), 4.0).item() > 0


def test_no_weight_decay_on_bn_bias_and_depthwise():
    model = compress.build("mobilenet_v2_cifar")
    decay, no_decay = param_groups(model, 1e-4)
    dw = model.features[2].conv[1][0].weight
    assert any(p is dw for p in no_decay["params"])
    assert any(p is model.features[2].conv[0][0].weight for p in decay["params"])
    assert all(p.ndim > 1 for p in decay["params"])
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == \
        sum(p.numel() for p in model.parameters())


def test_warmup_then_cosine_schedule():
    f = lr_lambda(TrainSettings(epochs=10, warmup_epochs=1), steps_per_epoch=10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)
    g = lr_lambda(TrainSettings(epochs=4, schedule="linear"), steps_per_epoch=5)
    assert g(10) == pytest.approx(0.5)


def test_resume_with_changed_settings_is_refused(tmp_path):
    model = compress.build("mobilenet_v3_small_cifar")
    data = DataSettings(spec="synthetic:64", batch_size=16, workers=0)
    cfg = TrainSettings(epochs=1, val_images=16, steps_per_epoch=2)
    fit(model, data, cfg, tmp_path / "run", quiet=True)
    changed = cfg.model_copy(update={"lr": 0.2})
    with pytest.raises(CompressError, match=r"settings changed \(lr: 0.1 -> 0.2\)"):
        fit(compress.build("mobilenet_v3_small_cifar"), data, changed, tmp_path / "run", resume=True, quiet=True)


def test_quantization_aware_epochs_train_the_int8_net_and_return_a_plain_one(tmp_path, cifar_dir):
    """The last epoch runs through int8 arithmetic: keep_best scores the int8 net from a
    calibrated start, and the returned model is a plain module (its checkpoint loads as any
    other) whose weights lie exactly on the per-channel int8 grid the exporters quantize to,
    folded with the BN statistics it returns."""
    from compress.int8 import bn_fold, conv_bn_pairs, weight_on_grid
    from compress.settings import FinetuneSettings
    model = compress.load(TRAINED)
    data = DataSettings(spec=f"cifar10:{cifar_dir}", batch_size=32, workers=0)
    settings = FinetuneSettings(epochs=2, qat_epochs=1, steps_per_epoch=3, lr=0.002, warmup_epochs=0, holdout=128,
                                eval_every=0)
    tuned = fit(model, data, settings, tmp_path, validate=False, quiet=True)
    record = json.loads((tmp_path / "keep_best.json").read_text())
    assert record["int8"] and record["start"]["step"] == 3 and record["start"]["top1"] > 0.4  # ranges calibrated
    assert set(tuned.state_dict()) == set(compress.load(ROOT / "tests" / "fixtures" /
                                                        "mobilenet_v2_cifar_w035_trained.pt").state_dict())
    pairs = conv_bn_pairs(tuned, torch.zeros(1, 3, 32, 32))
    assert len(pairs) > 10
    for layer, bn in pairs:
        with torch.no_grad():
            assert torch.allclose(weight_on_grid(layer.weight, bn_fold(layer.weight, bn)), layer.weight,
                                  rtol=1e-5, atol=1e-7)
    compress.save_checkpoint(tmp_path / "q.pt", tuned)
    assert compress.load(tmp_path / "q.pt")(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_a_quantization_aware_epoch_at_a_training_lr_keeps_what_the_net_knew(tmp_path, cifar_dir):
    """Quantization-aware steps at a training lr (half the one the fixture was trained at)
    leave the int8 net near its start: with BN statistics frozen the same steps blew the
    activations up and left it near chance (12% top-1, from 56%)."""
    from compress.data.specs import sample_labelled
    from compress.settings import FinetuneSettings
    model = compress.load(TRAINED)
    images, labels = sample_labelled(f"cifar10:{cifar_dir}", False, 500, 32, model.card.mean, model.card.std, seed=1)

    def top1(net):
        with torch.no_grad():
            return (net.eval()(images).argmax(1) == labels).float().mean().item()
    start = top1(model)
    data = DataSettings(spec=f"cifar10:{cifar_dir}", batch_size=32, workers=0)
    settings = FinetuneSettings(epochs=1, qat_epochs=1, steps_per_epoch=8, lr=0.05, warmup_epochs=0, block_steps=0,
                                keep_best=False, holdout=0)
    tuned = fit(model, data, settings, tmp_path, validate=False, quiet=True)
    assert top1(tuned) > start - 0.15, (start, top1(tuned))


def test_quantization_aware_epochs_are_refused_where_they_cannot_run(cifar_dir):
    from compress.settings import FinetuneSettings
    with pytest.raises(ValueError, match="ema_decay: 0"):
        FinetuneSettings(epochs=2, qat_epochs=1, ema_decay=0.999)
    out = run_cli("finetune", TRAINED, "--data",
                  f"cifar10:{cifar_dir}", "--epochs", "1", "--qat-epochs", "2", "-o", "unused.pt")
    assert out.returncode == 2 and "--qat-epochs" in out.stderr and "at most --epochs" in out.stderr, out.stderr
