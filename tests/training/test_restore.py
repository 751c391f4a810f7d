"""Super-resolution (the restore task): low/high-resolution pairs made from any image set
(`sr:SPEC:xN`), PSNR/SSIM and fidelity, and an ESPCN-style net through prune -> recover ->
evaluate -> ONNX and TFLite with parity, its pixel-shuffle input held."""
import json
import re

import pytest
import torch
from torch import nn
from torchvision.transforms import v2

import compress
from compress import CompressError
from compress.errors import CheckFailed
from compress.data.specs import DataSpec, eval_set, loader, random_subset, split
from compress.training.evaluate import evaluate
from compress.training.restoration import psnr
from conftest import run_cli


def test_sr_pairs_are_a_crop_and_its_bicubic_downscaling(cifar_dir):
    ds = eval_set(f"sr:cifar10:{cifar_dir}:x2", 16, (0, 0, 0), (1, 1, 1), None)
    low, high = ds[3]
    assert low.shape == (3, 16, 16) and high.shape == (3, 32, 32) and 0 <= high.min() and high.max() <= 1
    again = v2.functional.resize(high, [16, 16], interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    torch.testing.assert_close(low, again.clamp(0, 1))
    train = split(f"sr:cifar10:{cifar_dir}:x2", True, 8, (0.5,) * 3, (0.5,) * 3)
    low, high = train[0]
    assert low.shape == (3, 8, 8) and high.shape == (3, 16, 16) and low.min() < 0  # normalised input, [0, 1] target
    for bad in ("sr:cifar10:x2", f"sr:cifar10:{cifar_dir}", f"sr:cifar10:{cifar_dir}:x1", "sr:nope:DIR:x2"):
        with pytest.raises(CompressError, match="sr:SPEC:xN|bad data spec"):
            DataSpec.parse(bad)


def test_psnr_and_the_restore_meter():
    target = torch.full((2, 3, 8, 8), 0.5)
    noisy = target + 0.1 * torch.tensor([1.0, -1.0])[:, None, None, None]
    assert psnr(noisy, target).tolist() == pytest.approx([20.0, 20.0], abs=1e-4)  # 10 log10(1 / 0.01)
    from compress.training.tasks import Restore
    meter = Restore().meter(noisy, "cpu")
    meter.update(noisy, target, teacher_outputs=noisy)
    result = meter.result(distributed_sum=False)
    assert result["psnr"] == pytest.approx(20.0, abs=1e-4) and result["loss"] == pytest.approx(0.1)
    assert 0 < result["ssim"] < 1 and result["fidelity_psnr"] == pytest.approx(100.0)  # identical to the teacher


class ESPCN(nn.Module):
    """ESPCN-style x2 super-resolution: features at low resolution, a pixel shuffle, a last conv."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 32, 5, padding=2), nn.ReLU(), nn.Conv2d(32, 16, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(16, 8 * 4, 3, padding=1))
        self.up = nn.PixelShuffle(2)
        self.tail = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        return self.tail(self.up(self.body(x)))


@pytest.mark.slow
def test_an_espcn_prunes_recovers_scores_psnr_and_exports_with_parity(tmp_path, cifar_dir):
    from compress import stages
    from compress.settings import DataSettings, ExportSettings, PruneSettings, TrainSettings
    from compress.training.loop import fit
    torch.manual_seed(0)
    model = compress.describe(ESPCN(), 16, task="restore", mean=(0, 0, 0), std=(1, 1, 1))
    spec = f"sr:cifar10:{cifar_dir}:x2"
    held = loader(random_subset(eval_set(spec, 16, (0, 0, 0), (1, 1, 1), None), 256), 64)
    untrained = evaluate(model, held)
    data = DataSettings(spec=spec, batch_size=32, workers=0)
    quick = TrainSettings(epochs=1, steps_per_epoch=40, lr=0.001, optimizer="adamw", weight_decay=0.0,
                          holdout=64, keep_best=True, eval_every=0, val_images=64, channels_last=False)
    trained = fit(model, data, quick, tmp_path / "train", quiet=True)
    space = compress.ChannelSpace.from_model(trained, torch.randn(1, 3, 16, 16))
    assert "pixel shuffle" in space.held["body.4"] and {g.name for g in space.groups} == {"body.0", "body.2"}
    pruned = stages.prune(trained, PruneSettings(reconstruct_images=64), macs="60%", data=spec).model
    assert compress.count(pruned, 16)[0] <= 0.6 * compress.count(trained, 16)[0]
    recovered = fit(pruned, data, quick.model_copy(update={"kd_weight": 0.5}), tmp_path / "finetune",
                    teacher=trained, quiet=True)
    full, result = evaluate(trained, held), evaluate(recovered, held, teacher=trained)
    assert full["psnr"] > untrained["psnr"] + 3 and result["psnr"] > full["psnr"] - 2  # 40 steps: far from bicubic
    assert result["fidelity_psnr"] > 20 and 0 < result["ssim"] <= 1
    for fmt in ("onnx", "tflite"):
        report = stages.export(recovered, fmt, tmp_path / f"sr.{fmt}", data=spec)
        assert report["parity"]["max_abs_diff"] <= 1e-4 + 1e-4 * report["parity"]["max_abs_logit"]
        int8 = stages.export(recovered, fmt, tmp_path / f"sr_int8.{fmt}", ExportSettings(int8=True, calib_images=64),
                             data=spec)  # the gate: SSIM against the float model's images >= 0.98
        p = int8["parity"]
        assert p["agreement_of"] == "SSIM" and 0.98 <= p["top1_agreement"] < 1 and 25 < p["psnr_db"] < 60, p
    with pytest.raises(CheckFailed, match="SSIM against the float model is"):  # a floor no rounding can meet
        stages.export(recovered, "onnx", tmp_path / "sr_strict.onnx",
                      ExportSettings(int8=True, calib_images=64, min_agreement=1.0), data=spec)


def test_the_cli_evaluates_a_declared_restore_model(tmp_path, cifar_dir):
    (tmp_path / "sr.py").write_text("import torch\nfrom torch import nn\n\n"
                                    "def sr_net(num_classes=3):\n"
                                    "    torch.manual_seed(0)\n"
                                    "    return nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.PixelShuffle(2))\n")
    out = run_cli("eval", f"{tmp_path / 'sr.py'}:sr_net", "--task", "restore", "--input-size", "16", "--data",
                  f"sr:cifar10:{cifar_dir}:x2", "--images", "32")
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(r": PSNR \d+\.\d\d dB, SSIM -?\d\.\d{4}, loss", out.stdout), out.stdout
    model = compress.build(f"{tmp_path / 'sr.py'}:sr_net", input_size=16, task="restore")
    assert model.card.mean == (0, 0, 0) and model.card.std == (1, 1, 1) and model.card.num_classes == 3


@pytest.mark.slow
def test_the_shipped_sr_recipe_runs_end_to_end(tmp_path, cifar_dir):
    """recipes/sr_espcn.yaml, cut short: the report reads PSNR in dB, fidelity against the
    unpruned net's images, and every float file passes its parity check."""
    out = run_cli("run", "recipes/sr_espcn.yaml", f"out={tmp_path}", f"data.spec=sr:cifar10:{cifar_dir}:x2",
                  "data.workers=0", "transfer.steps_per_epoch=20", "transfer.val_images=64", "finetune.steps_per_epoch=5",
                  "finetune.block_steps=5",
                  "finetune.val_images=64", "export.parity_images=16", "latency.runs=3", "latency.warmup=1")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    report = (tmp_path / "sr_espcn" / "report.md").read_text()
    assert "test PSNR before fine-tune" in report and "Fidelity: the PSNR of the pruned net's output" in report
    row = next(line for line in report.splitlines() if line.startswith("| macs<=60% | "))
    assert re.search(r"\| \d+\.\d\d dB \| \d+\.\d\d dB \| \d+\.\d\d dB \| \d+% MACs, .*, [+-]\d+\.\d\d dB \| pass \|$", row)
    files = [line for line in report.splitlines() if ".onnx |" in line or ".tflite |" in line]
    assert len(files) == 4 and all(line.endswith("| pass |") for line in files)


def test_a_restore_model_recovers_quantization_aware_and_its_int8_file_passes_the_gate(tmp_path, cifar_dir):
    """Quantization-aware epochs serve every task: the ESPCN's last epoch runs through int8
    arithmetic (keep-best scoring PSNR), its weights come back on the per-channel int8 grid, and
    the int8 file's images keep an SSIM of at least 0.98 against the float model's."""
    from compress import stages
    from compress.int8 import bn_fold, conv_bn_pairs, weight_on_grid
    from compress.settings import DataSettings, ExportSettings, FinetuneSettings
    from compress.training.loop import fit
    torch.manual_seed(0)
    model = compress.describe(ESPCN(), 16, task="restore", mean=(0, 0, 0), std=(1, 1, 1))
    spec = f"sr:cifar10:{cifar_dir}:x2"
    settings = FinetuneSettings(epochs=2, qat_epochs=1, steps_per_epoch=10, lr=0.001, optimizer="adamw",
                                weight_decay=0.0, warmup_epochs=0, holdout=64, val_images=64, eval_every=0,
                                channels_last=False)
    tuned = fit(model, DataSettings(spec=spec, batch_size=32, workers=0), settings, tmp_path / "qat", quiet=True)
    assert json.loads((tmp_path / "qat" / "keep_best.json").read_text())["int8"]
    pairs = conv_bn_pairs(tuned, torch.zeros(1, 3, 16, 16))
    assert len(pairs) == 4 and all(torch.allclose(weight_on_grid(m.weight, bn_fold(m.weight, bn)), m.weight,
                                                  rtol=1e-5, atol=1e-7) for m, bn in pairs)
    report = stages.export(tuned, "tflite", tmp_path / "sr_int8.tflite", ExportSettings(int8=True, calib_images=64),
                           data=spec)
    assert report["parity"]["agreement_of"] == "SSIM" and report["parity"]["top1_agreement"] >= 0.98
