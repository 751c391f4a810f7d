"""Block-wise reconstruction: which blocks it finds on any CNN, that each block it keeps comes
closer to the teacher's on images it did not train on, that a block made worse is put back,
and that a fine-tune runs it first and says so."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torchvision
from torch.nn import functional as F

import compress
from compress.settings import DataSettings, FinetuneSettings
from compress.training.blockwise import find_blocks, reconstruct_blocks
from compress.training.loop import fit
from conftest import ROOT, TRAINED, run_cli


@pytest.fixture(scope="module")
def pruned_and_teacher(cifar_dir):
    from compress.data.specs import sample_labelled
    from compress.pruning.prune import prune_target, restore_outputs
    teacher = compress.load(TRAINED).eval()
    card = teacher.card
    x, y = sample_labelled(f"cifar10:{cifar_dir}", True, 384, card.input_size, card.mean, card.std, seed=0)
    pruned, info = prune_target(teacher, macs="40%", importance="energy", batch=(x, y))
    restore_outputs(teacher, pruned, info["kept"], x[:256], 256, 256)
    return pruned.eval(), teacher, x


def _kl(student, teacher, images):
    with torch.no_grad():
        return F.kl_div(F.log_softmax(student(images), 1), F.log_softmax(teacher(images), 1),
                        reduction="batchmean", log_target=True).item()


def test_blocks_are_the_modules_a_forward_pass_reaches_in_order_on_any_cnn():
    """On ResNet-18: the stem conv and its BN (chained), every basic block (chained to the one
    before, except the first, which a ReLU and a max-pool precede) and the classifier (after a
    pooling and a flatten); a teacher of another architecture shares no block."""
    net = torchvision.models.resnet18(num_classes=10).eval()
    example = torch.randn(2, 3, 64, 64)
    blocks = find_blocks(copy.deepcopy(net), net, example)
    layers = [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    assert [b.name for b in blocks] == ["conv1", "bn1", *layers, "fc"]
    assert [b.chained for b in blocks] == [False, True, False, *[True] * 7, False]
    assert blocks[0].bytes_per_image == (3 * 64 * 64 + 64 * 32 * 32) * 4
    assert find_blocks(torchvision.models.mobilenet_v2(num_classes=10).eval(), net, example) == []


@pytest.mark.slow
def test_each_kept_block_comes_closer_to_the_teacher_and_so_does_the_net_on_new_images(pruned_and_teacher):
    """A 40%-MAC MobileNetV2, refitted: every block of it found (the stem, 17 inverted-residual
    blocks, the last conv, the classifier), the ones kept closer to the teacher's block on the
    held-out images; the whole net's divergence from the teacher on 128 images none of this saw
    goes down."""
    pruned, teacher, x = pruned_and_teacher
    student = copy.deepcopy(pruned)
    records = reconstruct_blocks(student, teacher, x[:256], steps=100)
    assert [r["block"] for r in records] == [f"features.{i}" for i in range(19)] + ["classifier.1"]
    assert all(r["after"] < r["before"] for r in records if r["kept"]) and sum(r["kept"] for r in records) >= 10
    assert not any(r["kept"] for r in records if r["after"] == r["before"])
    assert _kl(student, teacher, x[256:]) < 0.9 * _kl(pruned, teacher, x[256:])


def test_a_block_made_worse_is_put_back(pruned_and_teacher):
    """At an lr that wrecks every block, none keeps its new weights: the net computes what it
    did (its BN statistics refolded, its function unchanged)."""
    pruned, teacher, x = pruned_and_teacher
    student = copy.deepcopy(pruned)
    records = reconstruct_blocks(student, teacher, x[:64], steps=5, lr=1e3, batch_size=16)
    assert records and not any(r["kept"] for r in records)
    with torch.no_grad():
        torch.testing.assert_close(student(x[256:]), pruned(x[256:]), rtol=1e-4, atol=1e-4)


def test_a_fine_tune_reconstructs_the_blocks_first_and_says_so(tmp_path, cifar_dir, pruned_and_teacher, capsys):
    pruned, teacher, _ = pruned_and_teacher
    settings = FinetuneSettings(epochs=1, steps_per_epoch=1, lr=0.001, block_steps=5, block_images=64,
                                keep_best=False, holdout=0)
    fit(copy.deepcopy(pruned), DataSettings(spec=f"cifar10:{cifar_dir}", batch_size=32, workers=0), settings,
        tmp_path, teacher=teacher, validate=False)
    records = json.loads((tmp_path / "blocks.json").read_text())
    assert len(records) == 20
    assert f"block-wise reconstruction: {sum(r['kept'] for r in records)} of 20 blocks" in capsys.readouterr().out


@pytest.mark.slow
def test_under_torchrun_rank_zero_reconstructs_and_every_rank_fine_tunes_its_weights(tmp_path, cifar_dir):
    """Two processes: the blocks are reconstructed once (one line, one blocks.json), every rank
    takes rank 0's weights (channels_last ones included) and the fine-tune finishes."""
    data = ["--data", f"cifar10:{cifar_dir}"]
    out = run_cli("prune", TRAINED, "--macs", "50%", *data, "-o", tmp_path / "p.pt")
    assert out.returncode == 0, out.stderr[-2000:]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "compress", "finetune", str(tmp_path / "p.pt"), *data, "--teacher", str(TRAINED),
                          "--workers", "0", "--batch-size", "32", "--epochs", "1", "--steps-per-epoch", "2", "--block-steps", "5",
                          "--block-images", "64", "--holdout", "64", "--run-dir", str(tmp_path / "run"),
                          "-o", str(tmp_path / "ft.pt")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("block-wise reconstruction: ") == 1
    assert len(json.loads((tmp_path / "run" / "blocks.json").read_text())) == 20
    assert (tmp_path / "ft.pt").is_file()
