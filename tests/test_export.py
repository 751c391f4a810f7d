import json

import numpy as np
import onnx
import pytest
import torch

import compress
from compress import CompressError
from compress.errors import CheckFailed
from conftest import run_cli
from compress.export import export_onnx, export_tflite, measure
from compress.export.latency import adb_commands, check_budget, measure_adb, parse_benchmark_model

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


@pytest.mark.parametrize("name", ["mobilenet_v1", "mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small",
                                  "mobilenet_v2_cifar"])
def test_onnx_export_parity_and_metadata(tmp_path, name):
    model = _confident(compress.build(name, input_size=SMALL.get(name)))
    report = export_onnx(model, tmp_path / "m.onnx")
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


def test_pruned_odd_widths_export_to_both_formats(tmp_path):
    model = _confident(compress.build("mobilenet_v3_small_cifar"))
    space = compress.ChannelSpace.from_model(model, torch.randn(1, 3, 32, 32), divisor=1, min_ratio=0.3)
    config = space.sample(np.random.default_rng(7))
    assert any(w % 8 for w in config.values())  # odd widths, not multiples of 8
    pruned = compress.prune(model, config, space)
    pruned.card = model.card.replace(config=config.to_dict(), space=space.settings())
    meta_config = json.loads({p.key: p.value for p in onnx.load(
        export_onnx(pruned, tmp_path / "p.onnx")["path"]).metadata_props}["compress.config"])
    assert meta_config == dict(config)
    report = export_tflite(pruned, tmp_path / "p.tflite")
    assert report["parity"]["max_abs_diff"] <= report["parity"]["limit"] and report["parity"]["max_abs_logit"] > 0.1


def _cifar_images(cifar_dir, model):
    from compress.data import sample_images
    mean, std = model.card.mean, model.card.std
    return (sample_images(f"cifar10:{cifar_dir}", True, 40, 32, mean, std),
            sample_images(f"cifar10:{cifar_dir}", False, 40, 32, mean, std))


def test_tflite_float_nhwc_and_int8(tmp_path, cifar_dir):
    model = _confident(compress.build("mobilenet_v2_cifar"))
    calib, images = _cifar_images(cifar_dir, model)
    nhwc = export_tflite(model, tmp_path / "f.tflite", nhwc=True, images=images)
    assert nhwc["parity"]["max_abs_diff"] <= nhwc["parity"]["limit"] and nhwc["parity"]["images"] == 40
    q = export_tflite(model, tmp_path / "q.tflite", int8=True, calib_images=calib, images=images)
    assert q["int8"] and q["bytes"] < 0.35 * nhwc["bytes"]  # int8 weights
    with pytest.raises(CheckFailed, match="int8 top-1 agrees .* under the required"):
        export_tflite(model, tmp_path / "q2.tflite", int8=True, calib_images=calib[:2], images=images,
                      min_agreement=1.01)
    with pytest.raises(CompressError, match="`int8` needs calibration images"):
        export_tflite(model, tmp_path / "q3.tflite", int8=True)


@pytest.mark.xfail(strict=True, reason="litert-torch 0.10 converts the PT2E int8 graph of MobileNetV2 into a "
                   "TFLite file that disagrees with it (the same graph simulated in PyTorch agrees 97.5% on "
                   "trained weights); see benchmarks/RESULTS.md. Strict: passes again when that is fixed.")
def test_int8_tflite_agrees_with_float(tmp_path, cifar_dir):
    model = _confident(compress.build("mobilenet_v2_cifar"))
    calib, images = _cifar_images(cifar_dir, model)
    q = export_tflite(model, tmp_path / "q.tflite", int8=True, calib_images=calib, images=images)
    assert q["parity"]["top1_agreement"] >= 0.9


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


def test_measure_both_runtimes_and_budget(tmp_path):
    model = compress.build("mobilenet_v3_small_cifar")
    export_onnx(model, tmp_path / "m.onnx")
    export_tflite(model, tmp_path / "m.tflite")
    for path in ("m.onnx", "m.tflite"):
        r = measure(tmp_path / path, threads=2, warmup=2, runs=10)
        assert r["runs"] == 10 and 0 < r["min_ms"] <= r["median_ms"] <= r["p90_ms"]
        assert r["threads"] == 2 and r["runtime"]
    with pytest.raises(CheckFailed, match=r"median .* ms > budget 1e-06 ms"):
        check_budget(r, 1e-6)
    check_budget(r, 1e6)
    with pytest.raises(CompressError, match="unknown backend 'tensorrt'"):
        measure(tmp_path / "m.onnx", backend="tensorrt")
    (tmp_path / "bad.onnx").write_bytes(b"garbage")
    with pytest.raises(CompressError, match="ONNX Runtime cannot load"):
        measure(tmp_path / "bad.onnx")
    with pytest.raises(CompressError, match="does not exist"):
        measure(tmp_path / "missing.tflite")


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
    bad = run_cli("export", "mobilenet_v3_small_cifar", "--format", "tflite", "--int8", "-o", tmp_path / "q.tflite")
    assert bad.returncode == 2 and "--int8 needs calibration images" in bad.stderr
    nodev = run_cli("latency", tmp_path / "m.onnx", "--device", "adb")
    assert nodev.returncode == 2 and ("not a .tflite" in nodev.stderr)
    missing = run_cli("latency", tmp_path / "nope.tflite")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
