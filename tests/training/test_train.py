import contextlib
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
                  "--kd-weight", "0.7", "-o", tmp_path / "ft.pt")
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


def test_keep_best_never_returns_worse_than_it_started(tmp_path, cifar_dir):
    """A trained net fine-tuned at an lr that wrecks it: every held-out check is worse than the
    start, so fit returns the starting weights exactly, and says so in keep_best.json."""
    from compress.training.evaluate import evaluate
    from compress.settings import FinetuneSettings
    from compress.data.source import DataSource
    from compress.training.loaders import spec_loaders
    trained = TRAINED
    model = compress.load(trained)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    data = DataSettings(spec=f"cifar10:{cifar_dir}", batch_size=32, workers=0)
    settings = FinetuneSettings(epochs=1, steps_per_epoch=6, lr=3.0, warmup_epochs=0, holdout=256, eval_every=2)
    tuned = fit(model, data, settings, tmp_path, validate=False, quiet=True)
    record = json.loads((tmp_path / "keep_best.json").read_text())
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert record["start"]["top1"] > 0.5 and metrics[-1]["holdout_top1"] < record["start"]["top1"] - 0.1
    assert record["step"] == 0 and record["top1"] == record["start"]["top1"]
    for key, value in tuned.state_dict().items():
        assert torch.equal(value, start[key]), key
    held = spec_loaders(DataSource.of(data), model.card, settings, validate=False)[0].holdout
    assert evaluate(tuned, held)["top1"] == record["top1"]  # the images it chose on, held out of training


def test_keep_best_takes_a_later_state_only_for_a_gain_beyond_noise(tmp_path):
    """A later state replaces the best only when it gets more held-out images right by more
    than one standard error of the paired difference: one image more, or three gained for one
    lost, leaves the start in place (a plain higher top-1 would have taken both); six more
    replaces it. Each held-out image is a one-hot vector, so a linear layer's columns set
    exactly which images each state gets right."""
    from torch.utils.data import DataLoader, TensorDataset
    from compress.training.tasks import Classify
    from compress.training.keep_best import Best
    images = 100
    loader = DataLoader(TensorDataset(torch.eye(images), torch.zeros(images, dtype=torch.long)), batch_size=16)

    def right_on(*ranges):
        model = torch.nn.Linear(images, 2, bias=False)
        with torch.no_grad():
            model.weight.copy_(torch.tensor([[0.0, 1.0]]).T.expand(2, images))  # class 1: wrong
            for lo, hi in ranges:
                model.weight[:, lo:hi] = torch.tensor([[1.0], [0.0]])
        return model

    best = Best(tmp_path / "best.pt", loader, "cpu", True, Classify())
    best.start(right_on((0, 60)), resumed=False)
    assert best.check(right_on((0, 61)), 1)["best_step"] == 0  # +1 image
    assert best.check(right_on((1, 63)), 2)["best_step"] == 0  # +3 -1
    assert best.check(right_on((0, 66)), 3) == {"holdout_top1": 0.66, "best_holdout_top1": 0.66, "best_step": 3}
    resumed = Best(tmp_path / "best.pt", loader, "cpu", True, Classify())
    resumed.start(right_on((0, 10)), resumed=True)  # knows the kept state's hits, not the current model's
    assert resumed.check(right_on((0, 67)), 4)["best_step"] == 3
    assert resumed.check(right_on((0, 72)), 5)["best_step"] == 5


def test_quantization_aware_epochs_train_the_int8_net_and_return_a_plain_one(tmp_path, cifar_dir):
    """The last epoch runs through int8 arithmetic: BN statistics stay frozen, keep_best scores
    the int8 net from a calibrated start, and the returned model is a plain module (its
    checkpoint loads as any other) whose weights lie exactly on the per-channel int8 grid the
    exporters quantize to."""
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
    float_state = torch.load(tmp_path / "best.pt", weights_only=True)["state"]  # where the int8 epoch began
    pairs = conv_bn_pairs(tuned, torch.zeros(1, 3, 32, 32))
    assert len(pairs) > 10
    for layer, bn in pairs:
        with torch.no_grad():
            assert torch.allclose(weight_on_grid(layer.weight, bn_fold(layer.weight, bn)), layer.weight,
                                  rtol=1e-5, atol=1e-7)
    for name, value in tuned.state_dict().items():
        if name.endswith(("running_mean", "running_var")):
            assert torch.equal(value, float_state[name]), name
    compress.save_checkpoint(tmp_path / "q.pt", tuned)
    assert compress.load(tmp_path / "q.pt")(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_quantization_aware_epochs_are_refused_where_they_cannot_run(cifar_dir):
    from compress.settings import FinetuneSettings
    with pytest.raises(ValueError, match="ema_decay: 0"):
        FinetuneSettings(epochs=2, qat_epochs=1, ema_decay=0.999)
    out = run_cli("finetune", TRAINED, "--data",
                  f"cifar10:{cifar_dir}", "--epochs", "1", "--qat-epochs", "2", "-o", "unused.pt")
    assert out.returncode == 2 and "--qat-epochs" in out.stderr and "at most --epochs" in out.stderr, out.stderr


def test_the_fine_tune_lr_follows_the_batch_size(tmp_path):
    """Without an lr, a fine-tune's lr is lr_base per 256 images at its batch size; the trial's
    candidates are spread around that same batch-scaled lr."""
    from compress.settings import FinetuneSettings
    from compress.training import lr_trial
    settings = FinetuneSettings(lr_base=0.008, lr_trial=0)
    assert [lr_trial.scaled_lr(settings, b) for b in (32, 64, 256)] == [0.001, 0.002, 0.008]
    net = compress.build("mobilenet_v3_small_cifar", input_size=16)
    data = DataSettings(spec="synthetic:96", batch_size=16, workers=0)
    trial = FinetuneSettings(epochs=1, steps_per_epoch=1, lr_trial=2, holdout=9, keep_best=True, eval_every=0)
    fit(net, data, trial, tmp_path / "trial", quiet=True)
    record = json.loads((tmp_path / "trial" / "lr_trial.json").read_text())
    assert record["batch_size"] == 16 and [c["lr"] for c in record["candidates"]] == pytest.approx(
        [0.008 * 16 / 256 * f for f in (0.25, 1, 4)])
    assert record["lr"] in [c["lr"] for c in record["candidates"]]


def test_the_lr_trial_picks_the_better_of_two_lrs_when_one_diverges():
    """An lr that blows the loss up loses the trial to one that trains, whatever their order; the
    trial leaves the caller's random state as it found it."""
    from torch.utils.data import DataLoader, TensorDataset
    from compress.settings import FinetuneSettings
    from compress.training import lr_trial
    from compress.training.loop import standard_step, train_epoch
    torch.manual_seed(0)
    net = compress.build("mobilenet_v3_small_cifar", input_size=16)
    images, labels = torch.randn(64, 3, 16, 16), torch.randint(0, 10, (64,))
    train = DataLoader(TensorDataset(images[:48], labels[:48]), batch_size=16, shuffle=True)
    held = DataLoader(TensorDataset(images[48:], labels[48:]), batch_size=16)
    cfg = FinetuneSettings(epochs=1, channels_last=False)
    step = standard_step(cfg)

    def run(model, loader, steps, optim):
        train_epoch(model, loader, steps, step, optim, contextlib.nullcontext(), cfg, 0, torch.device("cpu"), True,
                    None, model, "none yet")

    before = torch.get_rng_state()
    for lrs in ([1e-3, 1e5], [1e5, 1e-3]):
        results = lr_trial.trial(net, lrs, 4, train, held, cfg, run, torch.device("cpu"))
        by_lr = {r["lr"]: r["heldout_loss"] for r in results}
        assert by_lr[1e5] == float("inf") and by_lr[1e-3] < 10
        assert lr_trial.chosen(results) == 1e-3
    assert torch.equal(torch.get_rng_state(), before)


def test_the_terminal_names_the_state_fine_tuning_returned(tmp_path, cifar_dir):
    """chansearch finetune says which state it returned and why: here an lr that wrecks the net,
    so the start, and the best later state it turned down; without --lr, the lr trial's choice."""
    common = ["--data", f"cifar10:{cifar_dir}", "--batch-size", "32", "--workers", "0", "--epochs", "1",
              "--steps-per-epoch", "4", "--warmup-epochs", "0", "--holdout", "64", "--eval-every", "2",
              "--val-images", "32"]
    out = run_cli("finetune", TRAINED, *common, "--lr", "3.0", "-o", tmp_path / "wrecked.pt")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "keep_best: returned the starting state, held-out top1" in out.stdout
    assert "on 64 held-out images: no later state got more of them right by more than the noise" in out.stdout
    out = run_cli("finetune", TRAINED, *common, "--lr-trial", "2", "-o", tmp_path / "tried.pt")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "lr trial (2 steps each, held-out loss): 0.00025: " in out.stdout and "fine-tuning at lr" in out.stdout
    assert "keep_best: returned the " in out.stdout


def test_feature_distillation_matches_each_pruned_channel_to_the_one_it_was_cut_from(tmp_path, cifar_dir):
    """After pruning and the refit, each kept channel correlates best with the teacher channel it
    was cut from, so feature distillation needs no channel map in the checkpoint; the feature
    loss of a net against itself is zero; a fine-tune with it leaves no hook behind."""
    import copy as copylib
    from compress.data.specs import sample_labelled
    from compress.pruning.prune import prune_target, restore_outputs
    from compress.settings import FinetuneSettings
    from compress.training.features import FeatureMatch
    teacher = compress.load(TRAINED).eval()
    card = teacher.card
    x, y = sample_labelled(f"cifar10:{cifar_dir}", True, 256, card.input_size, card.mean, card.std, seed=0)
    pruned, info = prune_target(teacher, macs="50%", importance="energy", batch=(x, y))
    restore_outputs(teacher, pruned, info["kept"], x, 256, 256)
    match = FeatureMatch(pruned, teacher, x[:64])
    cut = {name: out for name, (out, _) in info["kept"].items()
           if len(out) < dict(teacher.named_modules())[name].weight.shape[0]}
    right = sum((match.channels[name] == torch.tensor(out)).sum().item() for name, out in cut.items())
    assert cut and right >= 0.95 * sum(len(out) for out in cut.values())
    match.remove()
    itself = FeatureMatch(copylib.deepcopy(teacher), teacher, x[:32])  # its set-up runs both nets once
    assert len(itself.names) == len(match.names) and itself.loss().item() == 0
    itself.remove()
    settings = FinetuneSettings(epochs=1, steps_per_epoch=2, lr=0.001, feature_weight=1.0, keep_best=False, holdout=0)
    tuned = fit(pruned, DataSettings(spec=f"cifar10:{cifar_dir}", batch_size=32, workers=0), settings, tmp_path,
                teacher=teacher, validate=False, quiet=True)
    assert all(not m._forward_hooks for m in tuned.modules()) and all(not m._forward_hooks for m in teacher.modules())


def test_with_a_teacher_keep_best_takes_the_state_closest_to_it_beyond_noise(tmp_path):
    """A fine-tune distilled from a teacher keeps the state whose held-out predictions come
    closer to the teacher's beyond one standard error of the paired difference, whatever its
    hits: a state with more held-out images right by chance but further from the teacher is
    turned down; one closer on ten images and further on eight is too; one closer on every image
    is taken."""
    from torch.utils.data import DataLoader, TensorDataset
    from compress.training.tasks import Classify
    from compress.training.keep_best import Best, summary
    images = 100
    loader = DataLoader(TensorDataset(torch.eye(images), torch.zeros(images, dtype=torch.long)), batch_size=16)

    def logits_on(margins):  # image i's logits (m_i, 0): column i of the weight
        model = torch.nn.Linear(images, 2, bias=False)
        with torch.no_grad():
            model.weight.zero_()
            model.weight[0] = torch.as_tensor(margins, dtype=torch.float32)
        return model

    teacher = logits_on([2.0] * images)
    best = Best(tmp_path / "best.pt", loader, "cpu", True, Classify(), teacher=teacher)
    best.start(logits_on([0.5] * 60 + [-0.5] * 40), resumed=False)  # 60 right
    # more right (65) but further from the teacher on the 60 it had right
    assert best.check(logits_on([0.1] * 65 + [-0.5] * 35), 1)["best_step"] == 0
    # closer on ten, further on eight: within the noise of the paired difference
    assert best.check(logits_on([0.9] * 10 + [0.1] * 8 + [0.5] * 42 + [-0.5] * 40), 2)["best_step"] == 0
    assert best.check(logits_on([1.5] * 60 + [-0.2] * 40), 3)["best_step"] == 3  # closer on every image
    line = summary(best.record, images)
    assert line.startswith("keep_best: returned the state after step 3, the closest to the teacher: held-out "
                           "divergence ") and "top1 60.00% -> 60.00% (on 100 held-out images)" in line
