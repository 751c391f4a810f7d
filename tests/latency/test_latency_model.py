import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import compress
from compress import CompressError
from compress.export.latency import measure_beside
from compress.latency import Clock, LatencyModel
from compress.latency.budget import TOLERANCE, best_under, corrected_cuts
from compress.latency.build import BesideUnpruned
from compress.latency.workers import export_all
from compress.latency.layers import FEATURES, TILES, features, layer_records, width
from compress.pruning.allocation import allocate
from compress.pruning.graph import example_input
from compress.pruning.prune import prune
from compress.pruning.space import ChannelSpace
from compress.settings import LutSettings
from compress.stages import export
from conftest import ResidualNet, run_cli

def _small(size=16):
    model = compress.build("mobilenet_v3_small_cifar", input_size=size).eval()
    return model, ChannelSpace.from_model(model, example_input(size, model))


def _linear_runtime(model, space):
    """A latency model's base record for `space`, and weights of a runtime whose time is linear
    in the work (FEATURES order)."""
    base = {"format": "compress.latency-model", "space_groups": [g.name for g in space.groups],
            "layers": layer_records(model, space)}
    return base, np.linspace(1, 2, len(FEATURES)) * np.array([1e-6 if f.endswith("macs") else 1e-4 for f in FEATURES])


def test_layer_widths_follow_the_config_exactly():
    """The width formulas give each layer's real channel counts in the pruned model."""
    model, space = _small()
    layers = layer_records(model, space)
    assert [l["name"] for l in layers] == [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for seed in range(3):
        config = space.sample(np.random.default_rng(seed))
        pruned = prune(model, config, space, importance="first")
        for layer in layers:
            m = pruned.get_submodule(layer["name"])
            real_in, real_out = (m.in_channels, m.out_channels) if isinstance(m, nn.Conv2d) else (m.in_features, m.out_features)
            assert (width(layer["in"], config, space), width(layer["out"], config, space)) == (real_in, real_out)


def test_the_work_it_reads_is_the_independent_mac_count():
    model, space = _small(32)
    layers = layer_records(model, space)
    macs = [i for i, f in enumerate(FEATURES) if f.endswith("_macs")]
    for config in (space.max(), space.min(), space.sample(np.random.default_rng(0))):
        assert features(layers, config, space)[macs].sum() == space.macs(config)


def test_the_activations_it_reads_are_those_the_pruned_model_runs_as_ops_of_their_own():
    """Hard-swish and hard-sigmoid run as ops of their own (a ReLU folds into its conv): the
    elements the latency model counts through them are the elements they output in the pruned model."""
    model, space = _small()
    layers = layer_records(model, space)
    assert {l["activation"] for l in layers} == {"Hardswish", "Hardsigmoid", None}
    column = FEATURES.index("activation_elements")
    for config in (space.max(), space.min(), space.sample(np.random.default_rng(0))):
        pruned, outputs = prune(model, config, space, importance="first"), []
        for m in pruned.modules():
            if isinstance(m, (nn.Hardswish, nn.Hardsigmoid)):
                m.register_forward_hook(lambda m, i, o: outputs.append(o.numel()))
        with torch.no_grad():
            pruned(example_input(16, pruned))
        assert features(layers, config, space)[column] == sum(outputs)


@pytest.mark.parametrize("tile", [(1, False), (16, False)])
def test_the_fit_recovers_a_latency_linear_in_the_work_at_the_kernels_tile(tile):
    """A runtime whose time is linear in the work, its kernels computing channels one by one or
    in tiles of 16: the fit picks that tile from its samples and predicts unseen configs exactly."""
    model, space = _small()
    base, truth = _linear_runtime(model, space)
    rng = np.random.default_rng(0)
    configs = [space.sample(rng) for _ in range(30)]
    ms = [float(truth @ features(base["layers"], c, space, tile)) + 0.05 for c in configs]
    fitted = LatencyModel.fit(base, space, list(zip(configs[:20], ms[:20])))
    assert fitted.tile == tile
    assert [fitted.predict(c) for c in configs[20:]] == pytest.approx(ms[20:], rel=1e-6)


def test_a_spoiled_timing_is_the_one_sample_suspected():
    """Times linear in the work, each off by up to 3% (the noise of a shared machine); one timing off
    by 40%, as a jump of a busy machine leaves it: that sample alone is suspected, and the first
    (the unpruned file every time is a ratio to) never is."""
    model, space = _small()
    base, truth = _linear_runtime(model, space)
    rng = np.random.default_rng(0)
    configs = [space.max(), *(space.sample(rng) for _ in range(23))]
    ms = [float(truth @ features(base["layers"], c, space)) * rng.uniform(0.97, 1.03) for c in configs]
    assert LatencyModel.fit(base, space, list(zip(configs, ms))).suspects() == []
    spoiled = list(ms)
    spoiled[0], spoiled[7] = 1.4 * ms[0], 1.4 * ms[7]
    assert LatencyModel.fit(base, space, list(zip(configs, spoiled))).suspects() == [7]


def test_tiles_round_the_widths_up():
    model, space = _small()
    layers, config = layer_records(model, space), space.sample(np.random.default_rng(0))
    assert (features(layers, config, space, (16, False)) >= features(layers, config, space)).all()
    assert features(layers, config, space, (16, False)).sum() > features(layers, config, space).sum()


@pytest.mark.parametrize("before", ["tiles", "unaligned_moves"])
def test_a_model_cached_by_an_earlier_version_is_refitted_from_its_own_samples(tmp_path, before):
    model, space = _small()
    base = {"format": "compress.latency-model", "space_groups": [g.name for g in space.groups],
            "layers": layer_records(model, space), "clock": {"runtime": "onnxruntime"}}
    rng = np.random.default_rng(1)
    configs = [space.sample(rng) for _ in range(12)]
    fitted = LatencyModel.fit(base, space, [(c, 0.1 + space.macs(c) * 1e-7) for c in configs])
    old = json.loads(json.dumps(fitted.record))
    if before == "tiles":
        del old["fit"]["tile"], old["fit"]["left_out_error"]
    else:  # a kind of work a later version reads: its weight is not in the file
        del old["fit"]["weights"]["unaligned_moves"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    loaded = LatencyModel.load(tmp_path / "old.json", space, identity={"runtime": "onnxruntime"})
    assert loaded.tile == fitted.tile and loaded.predict(space.min()) == pytest.approx(fitted.predict(space.min()))


def test_a_latency_budget_cuts_two_steps_where_one_saves_no_time():
    """Time in tiles of 16 channels in one group, linear in a second, more important one: the
    cut takes the cheap group down a whole tile rather than the important one channel by channel."""
    model, space = _small()
    tiled, linear = space.by_name["features.2.block.0.0"], space.by_name["features.3.block.0.0"]
    scores = {g.name: np.full(g.max, 10.0 if g is linear else 1.0) for g in space.groups}
    clock = lambda c: 1 + math.ceil(c[tiled.name] / 16) * 16 / 72 + 0.5 * c[linear.name] / linear.max  # noqa: E731
    config = allocate(space, {"latency": 2.2}, "global", scores, clock)
    assert clock(config) <= 2.2 and config[tiled.name] == 48
    assert all(config[g.name] == g.max for g in space.groups if g is not tiled)


def test_a_latency_budget_keeps_the_most_importance_per_millisecond():
    """Equal importance everywhere, time spent in one group only: the cut falls on that group."""
    model, space = _small()
    slow = space.groups[0]
    scores = {g.name: np.ones(g.max) for g in space.groups}
    clock = lambda c: 1.0 + c[slow.name] / slow.max  # noqa: E731
    config = allocate(space, {"latency": 1.6}, "global", scores, clock)
    assert clock(config) <= 1.6 and config[slow.name] < slow.max
    assert all(config[g.name] == g.max for g in space.groups[1:])


def _fitted_linear(model, space):
    """A latency model fitted to a runtime linear in the work, and that runtime's true ms."""
    base, truth = _linear_runtime(model, space)
    ms = lambda c: float(truth @ features(base["layers"], c, space)) + 0.05  # noqa: E731
    base.update(unpruned_ms=ms(space.max()), floor_ms=ms(space.min()))
    rng = np.random.default_rng(0)
    fitted = LatencyModel.fit(base, space, [(c, ms(c)) for c in (space.max(), *(space.sample(rng) for _ in range(19)))])
    return fitted, ms


def test_a_busy_machines_timings_still_lead_the_cuts_into_the_window():
    """A busy machine's timings, as a loaded suite saw them: the first cut timed at 1.9x its true
    time, the next two at 1.2x and 0.7x, so the faster-predicted cut measured slower. The cuts
    still move on into the window under the budget, none repeated (the step before stopped after
    3 cuts, out of the window, its next cut a repeat)."""
    model, space = _small()
    fitted, ms = _fitted_linear(model, space)
    scores = {g.name: np.arange(g.max, 0, -1.0) for g in space.groups}
    busy = iter([1.9, 1.2, 0.7])
    attempts = corrected_cuts(lambda target: allocate(space, {"latency": target}, "global", scores, fitted.predict),
                              lambda c: ms(c) * next(busy, 1.0) / ms(space.max()), fitted, "70%",
                              lambda: ms(space.max()), Clock("onnxruntime"), 8)
    configs = [a["config"] for a in attempts]
    assert len(configs) == len(set(configs)) >= 4
    assert (1 - TOLERANCE) * 0.7 <= attempts[-1]["measured"] <= 0.7
    assert best_under(attempts, 0.7) is attempts[-1]


def test_a_budget_in_ms_holds_when_the_unpruned_file_first_timed_slow():
    """The unpruned file first timed in a slow phase (here: 3x): the budget in ms is judged on its
    time as settled by the timings since, so the cut runs just under 3.5 ms where 3.5 ms was 70%
    of the unpruned file, not at a third of that (the loop took its scale from the first timing)."""
    model, space = _small()
    fitted, ms = _fitted_linear(model, space)
    scores = {g.name: np.arange(g.max, 0, -1.0) for g in space.groups}
    true_ms, settled = ms(space.max()), iter([3 * ms(space.max())])
    attempts = corrected_cuts(lambda target: allocate(space, {"latency": target}, "global", scores, fitted.predict),
                              lambda c: ms(c) / true_ms, fitted, f"{0.7 * true_ms}ms",
                              lambda: next(settled, true_ms), Clock("onnxruntime"), 5)
    assert attempts[0]["measured"] < 0.5  # aimed at the first, slow scale
    assert (1 - TOLERANCE) * 0.7 <= best_under(attempts, 0.7)["measured"] <= 0.7


def test_the_unpruned_files_time_leaves_out_a_slow_first_timing(tmp_path):
    """Its first timing taken in a slow phase (here: made 3x): once a cut is timed beside it, the
    unpruned file's time comes from the turns counted near its fastest."""
    model, space = _small(32)
    timer = BesideUnpruned(model, space, Clock(runtime="onnxruntime", runs=20), tmp_path)
    first_ms = timer.unpruned_ms
    timer.reference_ms[0] *= 3
    assert timer.unpruned_ms == pytest.approx(3 * first_ms)
    ratio = timer([space.uniform(0.5)])[0][0]
    assert 0 < ratio < 1 and 0.6 * first_ms < timer.unpruned_ms < 1.6 * first_ms


@pytest.mark.slow
def test_lut_cli_builds_checks_and_refuses_another_clock(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / "cache"))
    lut = ["lut", "mobilenet_v3_small_cifar", "--input-size", "16", "--runtime", "onnxruntime", "--samples", "6",
           "--runs", "5", "--quiet"]
    out = run_cli(*lut, "--check", "3", "-o", tmp_path / "lut.json")
    assert out.returncode == 0, out.stderr
    record = json.loads((tmp_path / "lut.json").read_text())
    assert record["clock"]["runtime"] == "onnxruntime" and len(record["fit"]["samples"]) == 6
    assert record["check"]["configs"] == 3 and "within +-10%" in out.stdout
    assert "channel tile, fitted" in out.stdout and tuple(record["fit"]["tile"]) in TILES
    # the machine's cache, which `prune --latency` reads, holds it: the next call times nothing
    again = run_cli(*lut, "-o", tmp_path / "again.json")
    assert "this machine's cached model" in again.stdout
    assert json.loads((tmp_path / "again.json").read_text()) == record
    fresh = run_cli(*lut, "--rebuild", "-o", tmp_path / "fresh.json")
    assert fresh.returncode == 0 and "cached" not in fresh.stdout
    rebuilt = json.loads((tmp_path / "fresh.json").read_text())
    assert rebuilt["built"] != record["built"] and "check" not in rebuilt
    assert json.loads(next((tmp_path / "cache").rglob("*.json")).read_text()) == rebuilt
    model, space = _small()
    fitted = LatencyModel.load(tmp_path / "lut.json", space)
    assert fitted.predict(space.max()) > fitted.predict(space.min()) > 0
    LatencyModel.load(tmp_path / "lut.json", ChannelSpace.from_model(model, example_input(16, model), min_ratio=0.5))
    v2 = compress.build("mobilenet_v2_cifar", input_size=16)
    with pytest.raises(CompressError, match="another channel space"):
        LatencyModel.load(tmp_path / "lut.json", ChannelSpace.from_model(v2, example_input(16, v2)))
    record["clock"]["machine"] = "another CPU [avx512f], 64 cores, Linux x86_64"
    (tmp_path / "moved.json").write_text(json.dumps(record))
    with pytest.raises(CompressError, match="another clock .*machine"):
        LatencyModel.load(tmp_path / "moved.json", space)


@pytest.mark.slow
def test_prune_to_a_latency_meets_it_as_measured(tmp_path):
    """The pruned file, exported and timed again on its own, runs under the budget; the report
    says what was predicted and measured."""
    model, space = _small(64)
    clock = LutSettings(runtime="onnxruntime", samples=8, runs=20)
    done = compress.prune(model, latency="70%", clock=clock, output=tmp_path / "p.pt")
    t = done.latency
    assert t["budget_ms"] == pytest.approx(0.7 * t["unpruned_ms"])  # a share of the unpruned file as timed now
    assert t["measured_ms"] <= t["budget_ms"] and t["predicted_ms"] > 0
    # within 5% under the budget, unless a busy machine kept every one of the 5 cuts out of that window
    assert t["measured_ms"] >= 0.95 * t["budget_ms"] or len(t["attempts"]) == 5
    again = export(compress.load(tmp_path / "p.pt"), "onnx", tmp_path / "p.onnx")["path"]
    unpruned = export(model, "onnx", tmp_path / "u.onnx")["path"]
    # as a ratio to the unpruned file, the two in turns, as the budget is: the other test worker
    # can slow this one by a third for a while, both files alike
    beside = measure_beside(again, unpruned, runs=100)
    assert beside["ms"] <= 1.1 * 0.7 * beside["reference_ms"]  # fresh sessions: 10% for their noise
    assert torch.load(tmp_path / "p.pt", weights_only=True)["provenance"]["latency"]["measured_ms"] == t["measured_ms"]


@pytest.mark.slow
def test_a_latency_below_the_floor_is_refused_before_the_model_is_sampled(tmp_path):
    out = run_cli("prune", "mobilenet_v3_small_cifar", "--input-size", "64", "--latency", "0.001ms", "--runtime",
                  "onnxruntime", "--samples", "30", "-o", tmp_path / "p.pt")
    assert out.returncode == 2 and "smallest config this space allows" in out.stderr and "measures" in out.stderr
    assert "sampled models" not in out.stderr and not (tmp_path / "p.pt").exists()
    out = run_cli("prune", "mobilenet_v3_small_cifar", "--input-size", "64", "--latency", "fast", "-o", tmp_path / "f.pt")
    assert out.returncode == 2 and "'fast' is not a latency like 3.5ms or 60%" in out.stderr
    out = run_cli("prune", "mobilenet_v3_small_cifar", "--input-size", "64", "--latency", "2ms", "--width", "0.5",
                  "-o", tmp_path / "q.pt")
    assert out.returncode != 0 and "not with a channel config or a width" in out.stderr


LATENCY_RECIPE = """
name: fast
out: {out}
model: {{name: mobilenet_v3_small_cifar, input_size: 64}}
data: {{spec: 'synthetic:96', batch_size: 16, workers: 0}}
supernet: {{method: none}}
prune:
  reconstruct_images: 32
  targets:
    - latency: 70%
  lut: {{runtime: onnxruntime, samples: 8, runs: 20}}
finetune: {{epochs: 0, val_images: 16}}
export: {{formats: [onnx]}}
latency: {{backend: onnxruntime, runs: 20, warmup: 2}}
"""


@pytest.mark.slow
def test_a_recipe_prunes_to_a_latency_target_and_checks_the_file_against_it(tmp_path):
    recipe = tmp_path / "fast.yaml"
    recipe.write_text(LATENCY_RECIPE.format(out=tmp_path / "runs"))
    out = run_cli("run", recipe, "--quiet")
    # 3: the latency stage's fresh timing of a file cut to within 5% under the budget may land over
    # it on a busy machine; that check is the user's, and it is what this test reads below
    assert out.returncode in (0, 3), out.stderr[-3000:]
    run = tmp_path / "runs" / "fast"
    pruned = torch.load(run / "prune" / "lat70pct.pt", weights_only=True)["provenance"]["latency"]
    assert pruned["measured_ms"] <= pruned["budget_ms"] and "onnxruntime" in pruned["clock"]
    report = (run / "report.md").read_text()
    assert (f"latency<=70%: {pruned['measured_ms']:.3f} ms measured, {pruned['predicted_ms']:.3f} ms predicted, "
            f"budget {pruned['budget_ms']:.3f} ms") in report
    command = next(line for line in report.splitlines() if line.startswith("chansearch prune "))
    assert "--runtime onnxruntime" in command and "--latency 70%" in command
    timed = json.loads((run / "latency" / "stage.json").read_text())["outputs"]["timings"]
    unpruned = next(t for t in timed if t["tag"] == "unpruned")
    target = next(t for t in timed if t["tag"] == "lat70pct")
    assert target["budget_ms"] == pytest.approx(0.7 * unpruned["median_ms"])  # a share of the file timed beside it


@pytest.mark.slow
def test_prune_to_an_int8_tflite_latency(tmp_path):
    """The budget is for the int8 file: the clock quantizes each cut before timing it."""
    # at 16 px and width 16 this net's int8 file runs in 0.03 ms, the interpreter's overhead, and a busy
    # machine timed its smallest cut at 96% of the unpruned file, over the 75% budget (here: about 22%)
    model = compress.describe(ResidualNet(size=32, width=96).eval(), input_size=32)
    clock = LutSettings(runtime="tflite", int8=True, samples=6, runs=20)
    done = compress.prune(model, latency="75%", clock=clock, output=tmp_path / "p.pt")
    t = done.latency
    assert t["measured_ms"] <= t["budget_ms"] and t["clock"].startswith("int8 tflite")
    assert done.macs < done.macs_before


@pytest.mark.slow  # TFLite conversions on worker processes
def test_files_converted_side_by_side_are_each_their_own_net(tmp_path):
    """export_all converts on a worker per core: each int8 file is byte for byte the file of its
    own net exported alone, in the order given."""
    model, space = _small()
    nets = [prune(model, c, space, importance="first") for c in (space.min(), space.uniform(0.5), space.max())]
    clock = Clock(runtime="onnxruntime", int8=True)
    together = [tmp_path / f"together{i}.onnx" for i in range(len(nets))]
    export_all(clock, nets, 16, together)
    for i, net in enumerate(nets):
        alone = tmp_path / f"alone{i}.onnx"
        clock.export(net, 16, alone)
        assert together[i].read_bytes() == alone.read_bytes()
    assert len({p.read_bytes() for p in together}) == len(nets)


@pytest.mark.slow  # TFLite conversions on worker processes
def test_a_script_without_a_main_guard_converts_on_workers_once(tmp_path):
    """The conversion workers are fresh interpreters: a user's script that builds a latency model
    at its top level (no `if __name__ == "__main__"`) runs once, not again in every worker."""
    script = tmp_path / "user_script.py"
    script.write_text(
        "import compress\n"
        "from compress.latency import Clock\n"
        "from compress.latency.workers import export_all\n"
        "from compress.pruning.graph import example_input\n"
        "from compress.pruning.prune import prune\n"
        "from compress.pruning.space import ChannelSpace\n"
        "print('script ran', flush=True)\n"
        "model = compress.build('mobilenet_v3_small_cifar', input_size=16).eval()\n"
        "space = ChannelSpace.from_model(model, example_input(16, model))\n"
        "nets = [prune(model, c, space, importance='first') for c in (space.min(), space.max())]\n"
        f"export_all(Clock(runtime='onnxruntime'), nets, 16, [r'{tmp_path}/a.onnx', r'{tmp_path}/b.onnx'])\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("script ran") == 1
    assert (tmp_path / "a.onnx").stat().st_size < (tmp_path / "b.onnx").stat().st_size
