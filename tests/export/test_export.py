import json

import numpy as np
import onnx
import pytest
import torch

import compress
from compress import CompressError
from compress.errors import CheckFailed
from conftest import TRAINED, run_cli
from compress.export import export_onnx, export_tflite, measure
from compress.export.capture import for_capture
from compress.export.latency import (adb_commands, check_budget, measure_adb, measure_beside, measure_in_turns,
                                     parse_benchmark_model)
from compress.pruning.prune import prune

SMALL = {"mobilenet_v1": 64, "mobilenet_v2": 64, "mobilenet_v3_large": 64, "mobilenet_v3_small": 64}


def _confident(model):
    """Give a random-init model activations of a trained one's size: BN statistics measured
    on random images (else activations shrink layer by layer to ~1e-20) and a head whose
    logits differ clearly between classes. Parity and agreement then mean something."""
    torch.manual_seed(0)
    size = model.card.input_size
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(8, 3, size, size))
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    head.weight.data.normal_(0, 0.5)
    return model.eval()


class _StandardizedConv(torch.nn.Conv2d):
    """Weight standardization (timm's StdConv2d): it rescales its own weights, so a BatchNorm
    folded into them would be undone."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return torch.nn.functional.conv2d(x, w, self.bias, self.stride, self.padding)


def _batchnorms(model):
    return sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_the_net_handed_to_the_converters_has_its_batchnorms_folded_and_computes_the_same():
    model = _confident(compress.build("mobilenet_v2_cifar"))
    before = _batchnorms(model)
    folded = for_capture(model)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # float32 rounding over 50 folded layers moves logits of up to 10 by 1e-4; a wrong fold by ~1
        assert torch.allclose(folded(x), model(x), rtol=1e-4, atol=1e-3)
    assert _batchnorms(folded) == 0 and _batchnorms(model) == before > 0  # the user's net is left as it was

    shared = torch.nn.Conv2d(8, 8, 3, padding=1)  # used twice: folding one use would change the other
    hooked = torch.nn.BatchNorm2d(8)
    hooked.register_forward_hook(lambda module, args, out: out * 2)
    odd = torch.nn.Sequential(torch.nn.Sequential(_StandardizedConv(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8)),
                              torch.nn.Sequential(shared, torch.nn.BatchNorm2d(8)),
                              torch.nn.Sequential(shared, torch.nn.BatchNorm2d(8)),
                              torch.nn.Sequential(torch.nn.Conv2d(8, 8, 1), hooked)).eval()
    with torch.no_grad():
        assert _batchnorms(for_capture(odd)) == 4 and torch.equal(for_capture(odd)(x), odd(x))


# (MobileNetV3-Small, the CIFAR variants and 20 more architectures: benchmarks/bench_coverage.py, and the tests below)
@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenet_v1", "mobilenet_v2", "mobilenet_v3_large"])
def test_onnx_export_parity_and_metadata(tmp_path, name):
    model = _confident(compress.build(name, input_size=SMALL.get(name)))
    in_place = [m for m in model.modules() if getattr(m, "inplace", False)]
    report = export_onnx(model, tmp_path / "m.onnx")  # exported out of place (faster), same function
    assert in_place and all(m.inplace for m in in_place)  # the user's net is left as it was
    parity = report["parity"]
    assert parity["max_abs_diff"] <= 1e-4 + 1e-4 * parity["max_abs_logit"] and parity["top1_agreement"] == 1.0
    with torch.no_grad():
        assert model(torch.randn(4, 3, report["input_size"], report["input_size"])).abs().max() > 1  # real logits
    meta = {p.key: p.value for p in onnx.load(tmp_path / "m.onnx").metadata_props}
    assert int(meta["compress.macs"]) == compress.count(model, SMALL.get(name, 32))[0]
    assert json.loads(meta["compress.mean"]) == list(model.card.mean)
    from compress.export.onnx import session
    out = session(tmp_path / "m.onnx").run(None, {"input": np.zeros((3, 3, report["input_size"],
                                                                    report["input_size"]), np.float32)})[0]
    assert out.shape[0] == 3  # dynamic batch


@pytest.mark.slow
def test_pruned_odd_widths_export_to_both_formats_and_time_on_both_runtimes(tmp_path):
    model = _confident(compress.build("mobilenet_v3_small_cifar"))
    space = compress.ChannelSpace.from_model(model, torch.randn(1, 3, 32, 32), divisor=1, min_ratio=0.3)
    config = space.sample(np.random.default_rng(7))
    assert any(w % 8 for w in config.values())  # odd widths, not multiples of 8
    pruned = prune(model, config, space)
    pruned.card = model.card.replace(config=config.to_dict(), space=space.settings())
    meta_config = json.loads({p.key: p.value for p in onnx.load(
        export_onnx(pruned, tmp_path / "p.onnx")["path"]).metadata_props}["compress.config"])
    assert meta_config == dict(config)
    report = export_tflite(pruned, tmp_path / "p.tflite")
    assert report["parity"]["max_abs_diff"] <= report["parity"]["limit"] and report["parity"]["max_abs_logit"] > 0.1
    for path in ("p.onnx", "p.tflite"):
        r = measure(tmp_path / path, threads=2, warmup=2, runs=10)
        assert r["runs"] == 10 and 0 < r["min_ms"] <= r["median_ms"] <= r["p90_ms"]
        assert r["threads"] == 2 and r["runtime"]
    beside = measure_beside(tmp_path / "p.tflite", tmp_path / "p.tflite", runs=40)  # in turns with itself
    assert beside["ms"] > 0 and 0.8 <= beside["ms"] / beside["reference_ms"] <= 1.25
    assert 4 <= beside["kept"] <= beside["turns"] and beside["turns"] % 5 == 0  # 40 runs: turns of 8 kept invokes
    # a fastest turn no timing comes near: timed once (no patience), then the turns near this timing's fastest count
    slower = measure_beside(tmp_path / "p.tflite", tmp_path / "p.tflite", runs=40, fastest_ms=1e-6, patience_s=0)
    assert slower["fastest_ms"] == 1e-6 and slower["turns"] == 5 and 1 <= slower["kept"] <= 5
    turns = measure_in_turns([tmp_path / "p.onnx", tmp_path / "p.tflite", tmp_path / "p.tflite"], runs=16, block=6)
    assert [t["backend"] for t in turns] == ["onnxruntime", "tflite", "tflite"]
    assert all(t["runs"] == 16 and t["in_turns_with"] == 2 and 0 < t["min_ms"] <= t["median_ms"] for t in turns)
    assert all(len(t["turn_ms"]) == 4 and min(t["turn_ms"]) <= t["median_ms"] <= max(t["turn_ms"]) for t in turns)
    assert 0.8 <= turns[1]["median_ms"] / turns[2]["median_ms"] <= 1.25
    with pytest.raises(CheckFailed, match=r"median .* ms > budget 1e-06 ms"):
        check_budget(r, 1e-6)
    check_budget(r, 1e6)
    with pytest.raises(CompressError, match="unknown backend 'tensorrt'"):
        measure(tmp_path / "p.onnx", backend="tensorrt")
    (tmp_path / "bad.onnx").write_bytes(b"garbage")
    with pytest.raises(CompressError, match="ONNX Runtime cannot load"):
        measure(tmp_path / "bad.onnx")
    with pytest.raises(CompressError, match="does not exist"):
        measure(tmp_path / "missing.tflite")


def _cifar_images(cifar_dir, model):
    from compress.data.specs import sample_images
    mean, std = model.card.mean, model.card.std
    return (sample_images(f"cifar10:{cifar_dir}", True, 40, 32, mean, std),
            sample_images(f"cifar10:{cifar_dir}", False, 40, 32, mean, std))


@pytest.mark.slow
def test_tflite_float_nhwc(tmp_path, cifar_dir):
    model = _confident(compress.build("mobilenet_v2_cifar"))
    _, images = _cifar_images(cifar_dir, model)
    nhwc = export_tflite(model, tmp_path / "f.tflite", nhwc=True, images=images)
    assert nhwc["parity"]["max_abs_diff"] <= nhwc["parity"]["limit"] and nhwc["parity"]["images"] == 40
    assert nhwc["input"]["shape"] == [1, 32, 32, 3] and nhwc["input"]["dtype"] == "float32"


@pytest.fixture(scope="session")
def trained():
    """A small MobileNetV2 trained on CIFAR-10 (tests/fixtures/make_trained.py): int8 error only
    means something on trained weights, whose activations have real ranges."""
    return compress.load(TRAINED).eval()


@pytest.fixture(scope="module")
def trained_tflite(trained, tmp_path_factory):
    """The trained net's float TFLite file, converted once for the tests that read it."""
    path = tmp_path_factory.mktemp("trained") / "f.tflite"
    export_tflite(trained, path)
    return path


# Floors this small net (trained from scratch, 55% top-1) meets on these 300 images: 94% TFLite
# static, 98% dynamic range, 85% ONNX static (measured; the transferred MobileNetV2 of
# benchmarks/RESULTS.md agrees 98% in TFLite). Under the 0.98 default: a weakly trained net has
# many near-ties, so the test sets its own floor, as a user's recipe would.
AGREEMENT = {("tflite", "int8"): 0.92, ("tflite", "int8_io"): 0.92, ("tflite", "dynamic_range"): 0.97,
             ("onnx", "int8"): 0.82}


@pytest.mark.slow
def test_int8_modes_agree_with_float_on_real_images(trained, tmp_path, cifar_dir):
    from compress import stages
    from compress.settings import ExportSettings
    data = f"cifar10:{cifar_dir}"
    reports = {}
    for fmt, mode in AGREEMENT:
        settings = ExportSettings(parity_images=300, min_agreement=AGREEMENT[fmt, mode], **{mode: True})
        reports[fmt, mode] = stages.export(trained, fmt, tmp_path / f"{mode}.{fmt}", settings, data=data)
    for (fmt, mode), report in reports.items():  # the agreement floor raised nothing
        p = report["parity"]
        assert p["images"] == 300 and report["quantize"] == mode and report["bias_correction"]
        assert p["accuracy"]["float"] > 0.5 and p["top1_agreement"] >= AGREEMENT[fmt, mode]  # trained: chance is 10%
        assert abs(p["accuracy"]["float"] - p["accuracy"]["exported"]) <= 0.05
        assert report["bytes"] < 0.5 * report["float_bytes"]  # int8 weights; small nets keep more float overhead
    io = reports["tflite", "int8_io"]
    assert io["input"]["dtype"] == "int8" and io["output"]["dtype"] == "int8" and io["input"]["scale"] > 0
    assert reports["tflite", "int8"]["input"]["dtype"] == "float32"  # drop-in for the float file
    latency = run_cli("latency", tmp_path / "int8_io.tflite", "--runs", "3", "--warmup", "1", "--json")
    assert latency.returncode == 0 and json.loads(latency.stdout)["median_ms"] > 0
    meta = {p.key: p.value for p in onnx.load(tmp_path / "int8.onnx").metadata_props}
    assert meta["compress.quantize"] == "int8" and json.loads(meta["compress.card"])["num_classes"] == 10


@pytest.mark.slow
def test_quantization_aware_net_computes_what_the_int8_file_does(trained, trained_tflite, tmp_path, cifar_dir):
    """The int8 file's input and output take the whole range they have on the calibration
    images (LiteRT's average of per-image ranges clips the top logits, tying the classes top-1
    is decided between). The fake-quantized net the int8 epochs train, its ranges measured on
    the same images, is a model of that file: its logits are closer to the file's than the
    float net's are, and it predicts the file's top-1 at least as often."""
    import copy
    from compress.data.specs import sample_images
    from compress.export.litert import open_interpreter, run_inputs
    from compress.export.quantize import calibrate, quantize_tflite
    from compress.training.qat import quantization_aware
    calib = sample_images(f"cifar10:{cifar_dir}", True, 64, 32, trained.card.mean, trained.card.std)
    images = sample_images(f"cifar10:{cifar_dir}", False, 100, 32, trained.card.mean, trained.card.std)
    ranges = calibrate(trained_tflite, calib.numpy())
    ends = open_interpreter(trained_tflite)
    logits = run_inputs(trained_tflite, calib.numpy())
    for detail, values in ((ends.get_input_details()[0], calib.numpy()), (ends.get_output_details()[0], logits)):
        assert float(ranges[detail["name"]]["min"].min()) == pytest.approx(float(values.min()))
        assert float(ranges[detail["name"]]["max"].max()) == pytest.approx(float(values.max()))
    assert float(ranges[ends.get_output_details()[0]["name"]]["max"].max()) > logits.max(1).mean() + 0.1

    quantize_tflite(trained_tflite, tmp_path / "q.tflite", "int8", calibration=ranges)
    file_logits = torch.from_numpy(run_inputs(tmp_path / "q.tflite", images.numpy()))
    simulated = quantization_aware(copy.deepcopy(trained), calib[:1])
    simulated.measure_ranges([calib])  # one batch: the ends take its whole range, as the file's do
    with torch.no_grad():
        sim, flt = simulated.eval()(images), trained(images)
    assert (sim - file_logits).abs().mean() < 0.75 * (flt - file_logits).abs().mean()  # 0.60x measured
    top1 = file_logits.argmax(1)
    assert (sim.argmax(1) == top1).float().mean() >= (flt.argmax(1) == top1).float().mean()


@pytest.mark.slow
def test_int8_keeps_the_most_sensitive_ops_in_float(trained, trained_tflite, tmp_path, cifar_dir):
    from compress.export.quantize import op_label, weighted_ops
    calib, images = _cifar_images(cifar_dir, trained)
    report = export_tflite(trained, tmp_path / "k.tflite", quantize="int8", calib_images=calib, images=images,
                           keep_float=2)
    assert len(report["keep_float"]) == 2
    names = [op_label(s) for s in weighted_ops(trained_tflite)]
    assert set(report["keep_float"]) <= set(names) and "output layer" in names and "features.0.0" in names


@pytest.mark.slow
def test_broken_calibration_fails_the_agreement_check(trained, tmp_path, cifar_dir):
    """Calibrating on constant gray images clips every real activation: the agreement check
    must catch it (exit 3), with the file and its numbers still written."""
    data = tmp_path / "gray"
    data.mkdir()
    with np.load(cifar_dir / "test.npz") as f:
        np.savez(data / "test.npz", x=f["x"][:300], y=f["y"][:300])
    np.savez(data / "train.npz", x=np.full((64, 32, 32, 3), 128, np.uint8), y=np.zeros(64, np.int64))
    ckpt = tmp_path / "m.pt"
    compress.save_checkpoint(ckpt, trained)
    # the same export calibrated on real images passes 0.9 (test_int8_modes_agree_with_float_on_real_images)
    args = ["--format", "tflite", "--int8", "--parity-images", "300", "--min-agreement", "0.9"]
    out = run_cli("export", ckpt, *args, "--calib-data", f"cifar10:{data}", "-o", tmp_path / "q.tflite")
    assert out.returncode == 3, out.stderr
    assert "int8 top-1 agrees with the float model on" in out.stderr and "under the required 90.0%" in out.stderr
    assert (tmp_path / "q.tflite").is_file() and "top-1 agreement with PyTorch" in out.stdout


@pytest.mark.parametrize("flags, message", [
    (["--format", "tflite", "--int8-io"], "--int8-io needs calibration images"),
    (["--format", "tflite", "--int8"], "--int8 needs calibration images"),
    (["--format", "tflite", "--dynamic-range", "--int8"], "--dynamic-range (int8 weights, float activations) and "
                                                          "--int8/--int8-io (static int8) are different modes"),
    (["--format", "onnx", "--int8-io", "--calib-data", "synthetic:8"], "are TFLite options"),
    (["--format", "onnx", "--dynamic-range"], "are TFLite options"),
    (["--format", "tflite", "--keep-float", "2"], "--keep-float applies to static int8"),
])
def test_export_flag_combinations_that_make_no_sense(tmp_path, flags, message):
    out = run_cli("export", "mobilenet_v3_small_cifar", *flags, "-o", tmp_path / "m.file")
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and not list(tmp_path.iterdir())


@pytest.mark.slow
def test_parity_failure_is_reported(tmp_path):
    model = _confident(compress.build("mobilenet_v3_small_cifar"))
    with pytest.raises(CheckFailed, match=r"outputs differ from PyTorch by up to .*tolerance 1e-20"):
        from compress.export.parity import compare
        compare("m.onnx", np.ones((2, 3)), np.ones((2, 3)) + 1e-6, tolerance=1e-20, rtol=0)
    with pytest.raises(CheckFailed, match=r"outputs differ from PyTorch by up to"):
        export_onnx(model, tmp_path / "m.onnx", tolerance=-1.0)
    assert (tmp_path / "m.onnx").exists()  # written, then reported


def test_input_size_the_model_cannot_take(tmp_path, user_net):
    compress.describe(user_net, input_size=16, mean=[0.5] * 3, std=[0.5] * 3)
    export_onnx(user_net, tmp_path / "ok.onnx")
    with pytest.raises(CompressError, match="cannot take a 32x32 input"):  # its head expects 8x8 maps
        export_onnx(user_net, tmp_path / "m.onnx", input_size=32)


# Real benchmark_model output (TFLite benchmark tool on a phone), in its two formats.
NEW_FORMAT = """\
INFO: The input model file size (MB): 24.6229
INFO: Initialized session in 119.515ms.
INFO: Running benchmark for at least 5 iterations and at least 0.5 seconds but terminate if exceeding 150 seconds.
INFO: count=9 first=87112 curr=51629 min=51629 max=87112 avg=58147.4 std=11478 p5=51629 median=51962 p95=87112

INFO: Running benchmark for at least 1000 iterations and at least 1 seconds but terminate if exceeding 150 seconds.
INFO: count=1000 first=52162 curr=49785 min=49088 max=686105 avg=63743.2 std=60716 p5=49620 median=51891 p95=68628

INFO: Inference timings in us: Init: 119515, First inference: 87112, Warmup (avg): 58147.4, Inference (avg): 63743.2
INFO: Note: as the benchmark tool itself affects memory footprint, the following is only APPROXIMATE to the actual memory footprint of the model at runtime. Take the information at your discretion.
INFO: Memory footprint delta from the start of the tool (MB): init=55.4961 overall=55.4961
"""
OLD_FORMAT = """\
Loaded model ./mobilenet_v1_1.0_224.tflite
The input model file size (MB): 16.9008
Initialized session in 17.187ms.
Running benchmark for at least 1 iterations and at least 0.5 seconds but terminate if exceeding 150 seconds.
count=1 curr=3512391

Running benchmark for at least 50 iterations and at least 1 seconds but terminate if exceeding 150 seconds.
count=50 first=2990275 curr=2913402 min=2727568 max=3189954 avg=2.95034e+06 std=109798

Inference timings in us: Init: 17187, First inference: 3512391, Warmup (avg): 3.51239e+06, Inference (avg): 2.95034e+06
"""


def test_parse_benchmark_model_output():
    new = parse_benchmark_model(NEW_FORMAT)
    assert new["runs"] == 1000 and new["median_ms"] == pytest.approx(51.891) and new["p95_ms"] == pytest.approx(68.628)
    assert new["min_ms"] == pytest.approx(49.088) and new["std_ms"] == pytest.approx(60.716)
    assert new["mean_ms"] == pytest.approx(63.7432) and new["init_ms"] == pytest.approx(119.515)
    old = parse_benchmark_model(OLD_FORMAT)
    assert old["runs"] == 50 and old["median_ms"] == pytest.approx(2950.34) and old["median_is_average"]
    assert old["p95_ms"] is None and old["min_ms"] == pytest.approx(2727.568)
    with pytest.raises(CompressError, match="no timing lines"):
        parse_benchmark_model("ERROR: Could not open '/data/local/tmp/m.tflite'.")


def test_adb_command_construction(tmp_path):
    push, run = adb_commands(tmp_path / "m.tflite", serial="R58M12345", threads=4, warmup=5, runs=50,
                             use_xnnpack=False, taskset="f0")
    assert push == ["adb", "-s", "R58M12345", "push", str(tmp_path / "m.tflite"), "/data/local/tmp/m.tflite"]
    assert run[:4] == ["adb", "-s", "R58M12345", "shell"]
    assert run[4] == ("taskset f0 /data/local/tmp/benchmark_model --graph=/data/local/tmp/m.tflite "
                      "--num_threads=4 --use_xnnpack=false --warmup_runs=5 --num_runs=50")
    assert adb_commands("m.tflite")[1] == ["adb", "shell", "/data/local/tmp/benchmark_model "
                                           "--graph=/data/local/tmp/m.tflite --num_threads=1 --use_xnnpack=true "
                                           "--warmup_runs=10 --num_runs=100"]


def test_adb_without_adb_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "m.tflite").write_bytes(b"x")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(CompressError, match="adb is not on PATH"):
        measure_adb(tmp_path / "m.tflite")


@pytest.mark.slow
def test_export_and_latency_cli(tmp_path, cifar_dir):
    out = run_cli("export", "mobilenet_v3_small_cifar", "--format", "onnx", "-o", tmp_path / "m.onnx",
                  "--calib-data", f"cifar10:{cifar_dir}", "--parity-images", "16", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["parity"]["images"] == 16
    ok = run_cli("latency", tmp_path / "m.onnx", "--runs", "5", "--budget-ms", "10000", "--json")
    assert ok.returncode == 0, ok.stderr
    result = json.loads(ok.stdout)
    assert result["median_ms"] > 0 and result["p90_ms"] > 0 and result["within_budget"]
    over = run_cli("latency", tmp_path / "m.onnx", "--runs", "5", "--budget-ms", "0.000001")
    assert over.returncode == 3 and "over budget" in over.stderr and "median" in over.stderr
    assert "Traceback" not in over.stderr
    nodev = run_cli("latency", tmp_path / "m.onnx", "--device", "adb")
    assert nodev.returncode == 2 and ("not a .tflite" in nodev.stderr)
    missing = run_cli("latency", tmp_path / "nope.tflite")
    assert missing.returncode == 2 and "does not exist" in missing.stderr


class TwoHeads(torch.nn.Module):
    """A dense model's output: a dict of per-pixel logits and an auxiliary head."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16),
                                        torch.nn.ReLU())
        self.out = torch.nn.Conv2d(16, 5, 1)
        self.aux = torch.nn.Conv2d(16, 3, 3, padding=1)

    def forward(self, x):
        y = self.body(x)
        return {"out": self.out(y) * 4, "aux": self.aux(y)}


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_a_dict_output_model_exports_every_output_with_its_own_parity(tmp_path, fmt):
    torch.manual_seed(0)
    model = compress.describe(TwoHeads().eval(), 32, num_classes=5)
    export = export_onnx if fmt == "onnx" else export_tflite
    report = export(model, tmp_path / f"m.{fmt}")
    assert report["outputs"] == ["out", "aux"]
    outputs = report["parity"]["outputs"]
    assert set(outputs) == {"out", "aux"} and all(r["max_abs_diff"] < 1e-4 for r in outputs.values())
    # each file output is the PyTorch output of the same name (shapes differ: 5 and 3 channels)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
    if fmt == "onnx":
        from compress.export.onnx import session
        got = session(tmp_path / "m.onnx").run(None, {"input": x.numpy()})
    else:
        from compress.export.litert import run_tflite
        got = run_tflite(tmp_path / "m.tflite", x)
    for name, array in zip(report["outputs"], got):
        np.testing.assert_allclose(array, want[name].numpy(), atol=1e-4)
    # int8 keeps both outputs and gates a segmenter on its first ("out"); the mIoU's arithmetic:
    # tests/export/test_task_export.py
    quantized = export(model, tmp_path / f"q.{fmt}", quantize="int8", calib_images=torch.randn(16, 3, 32, 32))
    p = quantized["parity"]
    assert quantized["outputs"] == ["out", "aux"] and set(p["outputs"]) == {"out", "aux"}
    assert p["gated_output"] == "out" and p["agreement_of"] == "mIoU" and 0 <= p["top1_agreement"] <= 1
    one_image = compress.describe(TwoHeads().eval(), 32, num_classes=5, task="restore")  # one image to compare
    with pytest.raises(CompressError, match="2 outputs \\(out, aux\\). Export it in float"):
        export(one_image, tmp_path / f"r.{fmt}", quantize="int8", calib_images=torch.randn(4, 3, 32, 32))


def test_a_runtime_that_is_not_installed_is_named_with_the_fix():
    """A runtime package missing on this platform (litert-torch has no Linux aarch64 wheels) is a
    CompressError naming the package and what to do, not an ImportError traceback."""
    from compress.logs import runtime
    with pytest.raises(CompressError, match=r"no-such-runtime is not installed here .*pip install no-such-runtime.*"
                                            r"export ONNX there"):
        runtime("no_such_runtime")
