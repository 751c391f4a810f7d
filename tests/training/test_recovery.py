"""Recovery: the fine-tune's lr (scaled to the batch, the lr trial), keep-best (by hits, by
divergence from a teacher, and what the terminal says of it) and feature distillation."""
import contextlib
import json
import re

import pytest
import torch
from torch import nn

import compress
from compress.settings import DataSettings
from compress.training.loop import fit
from conftest import TRAINED, run_cli


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


def test_the_fine_tune_lr_follows_the_batch_size(tmp_path):
    """Without an lr, a fine-tune's lr is lr_base per 256 images at its batch size; the trial
    starts from that same batch-scaled lr and its 4x, and walks by 4x from there."""
    from compress.settings import FinetuneSettings
    from compress.training import lr_trial
    settings = FinetuneSettings(lr_base=0.008, lr_trial=0)
    assert [lr_trial.scaled_lr(settings, b) for b in (32, 64, 256)] == [0.001, 0.002, 0.008]
    net = compress.build("mobilenet_v3_small_cifar", input_size=16)
    data = DataSettings(spec="synthetic:96", batch_size=16, workers=0)
    trial = FinetuneSettings(epochs=2, steps_per_epoch=3, lr_trial=2, holdout=9, keep_best=True, eval_every=0)
    fit(net, data, trial, tmp_path / "trial", quiet=True)
    record = json.loads((tmp_path / "trial" / "lr_trial.json").read_text())
    lrs = [c["lr"] for c in record["candidates"]]
    assert record["batch_size"] == 16 and lrs[:2] == pytest.approx([0.008 * 16 / 256, 0.008 * 16 / 256 * 4])
    assert 3 <= len(lrs) <= 4 and all(lr / 4 in lrs or lr * 4 in lrs for lr in lrs)
    assert record["lr"] in lrs and record["steps"] == 2  # lr_trial steps: more than an eighth of the run's 6


def _trial_setup(images: torch.Tensor, labels: torch.Tensor, train_images: int):
    """What lr_trial.trial and .search take besides the model and the lrs: the first
    `train_images` to train on, the rest held out, the settings and a step runner."""
    from torch.utils.data import DataLoader, TensorDataset
    from compress.settings import FinetuneSettings
    from compress.training.loop import standard_step, train_epoch
    train = DataLoader(TensorDataset(images[:train_images], labels[:train_images]), batch_size=16, shuffle=True)
    held = DataLoader(TensorDataset(images[train_images:], labels[train_images:]), batch_size=16)
    cfg = FinetuneSettings(epochs=1, channels_last=False)
    step = standard_step(cfg)

    def run(model, batches, steps, optim):
        train_epoch(model, batches, steps, step, optim, contextlib.nullcontext(), cfg, 0, torch.device("cpu"), True,
                    None, model, "none yet")
    return train, held, cfg, run, torch.device("cpu")


def test_the_lr_trial_picks_the_better_of_two_lrs_when_one_diverges():
    """An lr that blows the loss up loses the trial to one that trains, whatever their order; the
    trial leaves the caller's random state as it found it. Of two lrs within 1%, the smaller
    wins, or the larger in a run much longer than the trial."""
    from compress.training import lr_trial
    torch.manual_seed(0)
    net = compress.build("mobilenet_v3_small_cifar", input_size=16)
    setup = _trial_setup(torch.randn(64, 3, 16, 16), torch.randint(0, 10, (64,)), 48)
    before = torch.get_rng_state()
    for lrs in ([1e-3, 1e5], [1e5, 1e-3]):
        results = lr_trial.trial(net, lrs, 4, *setup)
        by_lr = {r["lr"]: r["heldout_loss"] for r in results}
        assert by_lr[1e5] == float("inf") and by_lr[1e-3] < 10
        assert lr_trial.chosen(results) == 1e-3 and lr_trial.chosen(results, larger=True) == 1e-3
    assert torch.equal(torch.get_rng_state(), before)
    tied = [{"lr": 1e-3, "heldout_loss": 1.0}, {"lr": 4e-3, "heldout_loss": 1.005}, {"lr": 1.6e-2, "heldout_loss": 1.2}]
    assert lr_trial.chosen(tied) == 1e-3 and lr_trial.chosen(tied, larger=True) == 4e-3


def test_the_lr_trial_climbs_while_a_larger_lr_trains_better():
    """From a base lr far too small to move a net in a few steps, the walk climbs by 4x while
    the larger lr's held-out loss is lower, up to its fourth try, and picks the largest."""
    from compress.training import lr_trial
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 2))
    labels = torch.randint(0, 2, (96,))
    images = torch.randn(96, 3, 8, 8)
    images[:, 0] += labels[:, None, None] * 2.0 - 1  # learnable in a few steps at a sound lr
    results = lr_trial.search(net, 1e-3, 8, *_trial_setup(images, labels, 64))
    assert [r["lr"] for r in results] == pytest.approx([1e-3, 4e-3, 1.6e-2, 6.4e-2])
    losses = [r["heldout_loss"] for r in results]
    assert losses == sorted(losses, reverse=True) and lr_trial.chosen(results) == pytest.approx(6.4e-2)


def test_a_long_run_s_lr_trial_ends_with_a_final_at_twice_the_walk_s_lr(tmp_path):
    """From a base lr far too small, the walk climbs to its fourth try (6.4e-2); in a run at
    least 8 tries long that lr then meets twice it over twice a try's steps (a quarter of the
    run here) and the larger, still training better, wins; a shorter run fine-tunes at the walk's
    lr with no final."""
    from compress.settings import FinetuneSettings
    from compress.training import lr_trial
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 2))
    labels = torch.randint(0, 2, (96,))
    images = torch.randn(96, 3, 8, 8)
    images[:, 0] += labels[:, None, None] * 2.0 - 1
    train, held, _, run, device = _trial_setup(images, labels, 64)
    cfg = FinetuneSettings(epochs=1, channels_last=False, lr_base=0.016, lr_trial=8)  # 1e-3 at batch 16
    records = {}
    for total in (64, 40):
        lr = lr_trial.resolve(net, cfg, 16, total, train, held, tmp_path / str(total), True, run, device, True)
        records[total] = json.loads((tmp_path / str(total) / "lr_trial.json").read_text())
        assert records[total]["lr"] == lr
    long, short = records[64], records[40]
    assert [r["lr"] for r in long["candidates"]] == pytest.approx([1e-3, 4e-3, 1.6e-2, 6.4e-2])
    assert long["final_steps"] == 16 and [r["lr"] for r in long["final"]] == pytest.approx([6.4e-2, 1.28e-1])
    assert long["final"][1]["heldout_loss"] < long["final"][0]["heldout_loss"] and long["lr"] == pytest.approx(0.128)
    assert short["final"] == [] and short["final_steps"] == 0 and short["lr"] == pytest.approx(6.4e-2)


def test_the_terminal_names_the_state_fine_tuning_returned(tmp_path, cifar_dir):
    """chansearch finetune says early how long it will take, and at the end which state it
    returned and why: here an lr that wrecks the net, so the start, and the best later state it
    turned down; without --lr, the lr trial's choice."""
    common = ["--data", f"cifar10:{cifar_dir}", "--batch-size", "32", "--workers", "0", "--epochs", "1",
              "--steps-per-epoch", "4", "--warmup-epochs", "0", "--holdout", "64", "--eval-every", "2",
              "--val-images", "32"]
    out = run_cli("finetune", TRAINED, *common, "--lr", "3.0", "-o", tmp_path / "wrecked.pt")
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(r"^4 steps at \d+\.\d\d s each here: about \d+ s for the run", out.stdout, re.M)
    assert "keep_best: returned the starting state, held-out top1" in out.stdout
    assert "on 64 held-out images: no later state got more of them right by more than the noise" in out.stdout
    out = run_cli("finetune", TRAINED, *common, "--lr-trial", "2", "-o", tmp_path / "tried.pt")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "lr trial: 2-4 tries of 2 steps before the run's 4 (giving an lr skips it)" in out.stdout
    assert "lr trial (2 steps each, annealed; held-out loss): 0.001: " in out.stdout and "fine-tuning at lr" in out.stdout
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
    settings = FinetuneSettings(epochs=1, steps_per_epoch=2, lr=0.001, feature_weight=1.0, keep_best=False, holdout=0,
                                block_steps=0)  # block-wise reconstruction is not what this is about
    tuned = fit(pruned, DataSettings(spec=f"cifar10:{cifar_dir}", batch_size=32, workers=0), settings, tmp_path,
                teacher=teacher, validate=False, quiet=True)
    assert all(not m._forward_hooks for m in tuned.modules()) and all(not m._forward_hooks for m in teacher.modules())


def test_with_a_teacher_keep_best_takes_the_state_closest_to_it_beyond_noise(tmp_path):
    """A fine-tune distilled from a teacher keeps a state whose held-out predictions come closer
    to the teacher's beyond one standard error of the paired difference, or one with more held-out
    images right beyond twice that noise: a state with three more images right by chance but
    further from the teacher is turned down; one closer on ten images and further on eight is too,
    and so is one closer to the teacher that gets eleven fewer right; one closer on every image is
    taken, and so is one that gets fifteen more right however far it moves from the teacher (a
    student past a teacher short of training), or one with a lower loss on the held-out labels
    beyond twice the noise."""
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
    # more right (63) but further from the teacher on the 60 it had right
    assert best.check(logits_on([0.1] * 63 + [-0.5] * 37), 1)["best_step"] == 0
    # closer on ten, further on eight: within the noise of the paired difference
    assert best.check(logits_on([0.9] * 10 + [0.1] * 8 + [0.5] * 42 + [-0.5] * 40), 2)["best_step"] == 0
    # closer to the teacher on average, but 11 of the 60 lost
    assert best.check(logits_on([1.9] * 49 + [-0.1] * 11 + [-0.4] * 40), 3)["best_step"] == 0
    assert best.check(logits_on([1.5] * 60 + [-0.2] * 40), 4)["best_step"] == 4  # closer on every image
    line = summary(best.record, images)
    assert line.startswith("keep_best: returned the state after step 4, the closest to the teacher: held-out "
                           "top1 60.00% at the start -> 60.00%, divergence from the teacher ") and "(on 100 held-out images)" in line
    assert best.check(logits_on([0.05] * 75 + [-0.5] * 25), 5)["best_step"] == 5  # 15 more right, far from it
    line = summary(best.record, images)
    assert line.startswith("keep_best: returned the state after step 5, more held-out images right by more than "
                           "twice the noise: held-out top1 60.00% at the start -> 75.00%")
    # as many right, surer of their labels than the teacher is (so further from it): taken for the labels
    assert best.check(logits_on([6.0] * 75 + [-0.5] * 25), 6)["best_step"] == 6
    assert best.record["taken_for"] == "labels" and "a lower loss on the held-out labels by more than twice the " \
        "noise" in summary(best.record, images)
    # of the 25 it gets wrong, surer of the label on 13 and less sure on 12: within the noise
    assert best.check(logits_on([6.0] * 75 + [-0.3] * 13 + [-0.7] * 12), 7)["best_step"] == 6


def test_keep_best_runs_the_teacher_once_per_held_out_batch_and_scores_as_if_it_ran_each_time(tmp_path):
    """The held-out images are the same at every check, so the teacher's outputs are remembered
    from the first; the divergences are those of a fresh teacher pass, and a loader that
    augments (other images at a batch's place) gets the teacher run on what it gives."""
    from torch.utils.data import DataLoader, TensorDataset
    from compress.training.evaluate import evaluate
    from compress.training.keep_best import Best
    from compress.training.tasks import Classify
    torch.manual_seed(0)
    images, labels = torch.randn(40, 3, 8, 8), torch.randint(0, 4, (40,))
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(192, 4))
    calls = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    students = [nn.Sequential(nn.Flatten(), nn.Linear(192, 4)) for _ in range(3)]
    loader = DataLoader(TensorDataset(images, labels), batch_size=16)
    best = Best(tmp_path / "best.pt", loader, "cpu", True, Classify(), teacher=teacher)
    best.start(students[0], resumed=False)
    best.check(students[1], 1)
    best.check(students[2], 2)
    assert len(calls) == 3  # 40 images in batches of 16, once
    fresh = evaluate(students[2], loader, teacher=teacher, task=Classify(), per_image=True)
    _, (_, _, divergence) = best._score(students[2])
    assert torch.equal(divergence, fresh["divergence"])

    class Flipping(TensorDataset):  # an augmenting loader: each pass gives other images
        def __getitem__(self, i):
            x, y = super().__getitem__(i)
            return (x.flip(2) if torch.rand(()) < 0.5 else x), y
    calls.clear()
    augmenting = Best(tmp_path / "best2.pt", DataLoader(Flipping(images, labels), batch_size=16), "cpu", True,
                      Classify(), teacher=teacher)
    augmenting.start(students[0], resumed=False)
    augmenting.check(students[1], 1)
    assert len(calls) == 6
