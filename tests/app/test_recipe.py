import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import compress
from compress import CompressError
from compress.app.cli import build_parser
from compress.app.flags import settings_from
from compress.pruning.profile import count
from compress.app.pipeline import for_this_machine
from compress.app.recipe import load_recipe
from compress.settings import FinetuneSettings, SupernetSettings
from compress.units import human
from conftest import ROOT, TRAINED, run_cli

TINY = """\
name: tiny
out: {out}
model:
  name: mobilenet_v3_small_cifar
  input_size: 16
data:
  spec: synthetic:128
  batch_size: 16
  workers: 0
  holdout: 32
supernet:
  method: slimmable
  epochs: 1
  steps_per_epoch: 2
  val_images: 16
search:
  method: evolution
  population: 4
  parents: 2
  mutations: 2
  crossovers: 2
  iterations: {iterations}
  recal_images: 16
  eval_images: 16
  targets:
    - macs: 70%
    - macs: 45%
finetune:
  epochs: 1
  steps_per_epoch: 2
  val_images: 16
  block_steps: 5          # the block-wise path runs; its default 200 a block is minutes here
export:
  formats: [onnx]
  int8: {int8}
  calib_images: 8
  min_agreement: 0.0       # an untrained tiny net: the file's numbers are what is checked
  parity_images: 4
latency:
  runs: 5
  warmup: 1
"""


def _recipe(tmp_path, iterations=1, name="tiny.yaml", int8=False, targets=2):
    path = tmp_path / name
    text = TINY.format(out=tmp_path / "runs", iterations=iterations, int8=str(int8).lower())
    path.write_text(text if targets == 2 else text.replace("    - macs: 45%\n", ""))
    return path


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates_and_would_run_on_this_cpu(path, caplog):
    recipe = load_recipe(path)
    assert recipe.targets() and recipe.name == path.stem
    if torch.cuda.is_available():
        return
    caplog.set_level("INFO", logger="compress")
    here = for_this_machine(recipe)  # mixed precision falls back, said in one line per section
    sections = [s for s in ("transfer", "supernet", "finetune") if getattr(recipe, s) and getattr(recipe, s).amp != "none"]
    assert all(getattr(here, s).amp == "none" for s in sections)
    assert [m for m in caplog.messages if ".amp: bf16 needs a CUDA device" in m] == [
        f"{s}.amp: bf16 needs a CUDA device and this machine has none: the {s} runs in float32 (set {s}.amp=none to "
        "silence this)" for s in sections]


@pytest.mark.slow
def test_tiny_recipe_end_to_end_then_skips_then_reruns_what_changed(tmp_path):
    recipe = _recipe(tmp_path, int8=True)
    out = run_cli("run", recipe, "--quiet")
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "runs" / "tiny"
    report = (run / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| macs<=")]
    files = [row for row in rows if ".onnx |" in row]  # the exports table: one row per file
    assert len(rows) == 6 and len(files) == 4 and all(row.endswith("| pass |") for row in rows)
    quantized = [row for row in files if "_int8.onnx" in row]  # beside its float file, with its ratios
    assert len(quantized) == 2 and all("x) |" in row and "agreement" in row for row in quantized)
    assert (run / "report.png").is_file() and (run / "search.png").is_file()
    assert "chansearch supernet mobilenet_v3_small_cifar" in report  # the equivalent commands
    parser = build_parser()
    commands = [line for line in report.splitlines() if line.startswith("chansearch ")]
    assert [c.split()[1] for c in commands] == ["supernet", "search", "extract", "extract", "finetune", "finetune",
                                                 *["export"] * 4, *["latency"] * 4]
    recipe_settings = load_recipe(recipe)
    for line in commands:  # each parses, and the training ones give back the recipe's settings
        args = parser.parse_args(shlex.split(line)[1:])
        if args.command == "finetune":
            assert settings_from(FinetuneSettings, args) == recipe_settings.finetune
        if args.command == "supernet":
            assert settings_from(SupernetSettings, args) == recipe_settings.supernet
    for stage in ("supernet", "search", "extract", "finetune", "export", "latency"):
        assert json.loads((run / stage / "stage.json").read_text())["outputs"] is not None, stage
    assert len(list((run / "export").glob("*.onnx"))) == 4

    again = run_cli("run", recipe, "--quiet")
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("done earlier, skipped") == 6

    # export.int8=false from here on: the int8 path ran above, and each int8 export costs seconds
    changed = run_cli("run", recipe, "--quiet", "finetune.from_scratch=true", "export.int8=false")
    assert changed.returncode == 0, changed.stderr[-2000:]
    for stage in ("supernet", "search", "extract"):
        assert f"{stage}: done earlier, skipped" in changed.stdout
    for stage in ("finetune", "export", "latency"):
        assert f"{stage}: inputs changed, re-running" in changed.stdout
        assert (run / f"{stage}.previous" / "stage.json").is_file()
    for tag, net in json.loads((run / "finetune" / "stage.json").read_text())["outputs"]["nets"].items():
        record = torch.load(net["path"], weights_only=True)
        assert record["provenance"]["from_scratch"] and record["provenance"]["epochs"] == 1, tag

    # only the budget changes: the latency stage re-runs on the files just exported
    over = run_cli("run", recipe, "--quiet", "finetune.from_scratch=true", "export.int8=false",
                   "latency.budget_ms=0.000001")
    assert over.returncode == 3, over.stderr[-2000:]
    assert "latency" in over.stderr and "over the 1e-06 ms budget" in over.stderr
    assert over.stdout.count("done earlier, skipped") == 5
    assert "| FAIL |" in (run / "report.md").read_text()  # written before exiting

    # from pretrained weights, the searched widths cut from them: the supernet and everything after re-run
    # (for one target: a second doubles every stage after the search)
    torch.manual_seed(1)
    weights = tmp_path / "weights.pth"
    torch.save(compress.build("mobilenet_v3_small_cifar", num_classes=10, input_size=16).state_dict(), weights)
    cut = run_cli("run", recipe, "--quiet", "export.int8=false", f"model.pretrained={weights}",
                  "extract.weights=teacher", "search.targets=[{macs: 70%}]")
    assert cut.returncode == 0, cut.stderr[-2000:]
    assert "supernet: inputs changed, re-running" in cut.stdout
    unpruned = run / "extract" / "unpruned.pt"
    extract = json.loads((run / "extract" / "stage.json").read_text())["outputs"]
    assert extract["teacher"] == str(unpruned)  # the model the widths were cut from teaches their fine-tune
    search = json.loads((run / "search" / "stage.json").read_text())["outputs"]
    assert len(search["targets"]) == len(extract["nets"]) == 1
    for entry, net in zip(search["targets"], extract["nets"].values()):
        record = torch.load(net["path"], weights_only=True)
        assert record["provenance"]["weights"] == "teacher" and record["config"] == entry["config"]
    assert f"--teacher {unpruned}" in (run / "report.md").read_text()


@pytest.mark.slow
def test_killed_recipe_resumes_the_interrupted_stage(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    # one target: the resume is the search's, and a second target doubles every stage after it
    assert run_cli("run", _recipe(tmp_path / "a", iterations=3, targets=1), "--quiet").returncode == 0
    recipe = _recipe(tmp_path / "b", iterations=3, targets=1)
    proc = subprocess.Popen([sys.executable, "-m", "compress", "run", str(recipe), "--quiet"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "b" / "runs" / "tiny" / "search" / "state.json"
    deadline = time.time() + 300
    while time.time() < deadline and not (state.exists() and len(json.loads(state.read_text())["evaluated"]) >= 6):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (state.parent / "stage.json").exists()
    resumed = run_cli("run", recipe, "--quiet")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "supernet: done earlier, skipped" in resumed.stdout and "search: resuming" in resumed.stdout
    a = json.loads((tmp_path / "a" / "runs" / "tiny" / "search" / "search.json").read_text())
    b = json.loads(state.with_name("search.json").read_text())
    assert [t["config"] for t in a["targets"]] == [t["config"] for t in b["targets"]]
    assert b["evaluated_now"] < b["evaluated"]


def test_recipe_errors_name_file_line_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.format(out=tmp_path, iterations=1, int8="false").replace("    - macs: 45%", "    - macs: 150Q")
                   .replace("  eval_images: 16", "  eval_imgs: 16"))
    with pytest.raises(CompressError) as err:
        load_recipe(bad)
    text = str(err.value)
    assert f"{bad}:27 search.targets[1].macs: '150Q' is not a MAC count" in text
    assert f"{bad}:24 search.eval_imgs: unknown key 'eval_imgs' (did you mean 'eval_images'?)" in text
    with pytest.raises(CompressError, match=r"finetune.epochs: 'two'"):
        load_recipe(_recipe(tmp_path), ["finetune.epochs=two"])
    with pytest.raises(CompressError, match=r"prune: .*unknown importance 'magnitude'; choose auto or one of energy"):
        load_recipe(_recipe(tmp_path), ["prune.importance=magnitude"])
    (tmp_path / "broken.yaml").write_text("name: x\nmodel: [\n")
    out = run_cli("run", tmp_path / "broken.yaml")
    assert out.returncode == 2 and "broken.yaml:3: malformed YAML" in out.stderr
    out = run_cli("run", _recipe(tmp_path), "data.spec=cifar10:/nowhere")
    assert out.returncode == 2 and "data.spec: '/nowhere' does not exist" in out.stderr
    assert not (tmp_path / "runs").exists()  # nothing started
    out = run_cli("run", _recipe(tmp_path), "supernet.method=none")
    assert out.returncode == 2 and "give prune.targets" in out.stderr


def test_print_config_shows_defaults_and_overrides(tmp_path):
    out = run_cli("run", _recipe(tmp_path), "--print-config", "finetune.epochs=7", "search.targets[0].macs=60%")
    assert out.returncode == 0, out.stderr
    assert "epochs: 7" in out.stdout and "macs: 60%" in out.stdout and "kd_temperature: 4.0" in out.stdout
    assert "  kd_temperature: 4.0  # KD softmax temperature\n" in out.stdout  # each key with its description
    resolved = load_recipe(_recipe(tmp_path), ["finetune.epochs=7", "search.targets[0].macs=60%"])
    assert yaml.safe_load(out.stdout) == resolved.model_dump(mode="json")  # and it loads back as the same recipe
    assert not Path(tmp_path / "runs").exists()


DIRECT = """\
name: direct
out: {out}
model:
  name: mobilenet_v2_cifar
  width_mult: 0.35
  pretrained: {weights}
  num_classes: 10
data:
  spec: cifar10:{data}
  batch_size: 16
  workers: 0
transfer:
  epochs: 1
  steps_per_epoch: 2
  val_images: 32
supernet:
  method: none
prune:
  reconstruct_images: 64
  targets:
    - macs: 50%
finetune:
  epochs: 0
  val_images: 300
export:
  formats: [onnx]
latency:
  runs: 3
  warmup: 1
"""


@pytest.mark.slow
def test_direct_recipe_transfers_prunes_and_reports_against_the_unpruned_model(tmp_path, cifar_dir):
    """The main job as a recipe: pretrained weights learn the data first (the transfer stage);
    the transferred net is pruned with its data (energy, refit), and the report compares the
    target with it: top-1 on the same test images, MAC share, measured latency ratio."""
    from compress.data.specs import eval_set, loader, random_subset
    from compress.training.evaluate import evaluate
    weights = tmp_path / "pretrained.pth"  # a trained net's weights, as a torchvision-style state_dict
    torch.save(compress.load(TRAINED).state_dict(), weights)
    recipe = tmp_path / "direct.yaml"
    recipe.write_text(DIRECT.format(out=tmp_path / "runs", weights=weights, data=cifar_dir))
    out = run_cli("run", recipe, "--quiet")
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "runs" / "direct"
    transferred = compress.load(run / "transfer" / "model.pt")
    pretrained = torch.load(weights, weights_only=True)
    assert not torch.equal(transferred.features[0][0].weight, pretrained["features.0.0.weight"])  # it trained
    record = torch.load(run / "prune" / "macs50pct.pt", weights_only=True)
    assert record["provenance"]["parent"] == str(run / "transfer" / "model.pt")
    assert record["provenance"]["reconstructed_on"] == 64 and record["provenance"]["importance"] == "energy"

    report = (run / "report.md").read_text()
    unpruned = next(line for line in report.splitlines() if line.startswith("| unpruned |"))
    card = transferred.card
    test = random_subset(eval_set(f"cifar10:{cifar_dir}", card.input_size, card.mean, card.std, card.num_classes),
                         300, 0)
    top1 = evaluate(transferred, loader(test, 100, 0), "cpu", distributed_sum=False)["top1"]
    assert f"| {human(count(transferred, card.input_size)[0])} |" in unpruned and f"| {top1:.2%} |" in unpruned
    target = next(line for line in report.splitlines() if line.startswith("| macs<=50% |"))
    after = float(target.split("|")[6].strip().rstrip("%")) / 100
    timed = {(t["tag"], t["variant"]): t for t in
             json.loads((run / "latency" / "stage.json").read_text())["outputs"]["timings"]}
    assert all(t["measured"]["in_turns_with"] == len(timed) - 1 for t in timed.values())  # one window for the ratios
    speedup = timed["macs50pct", "onnx"]["median_ms"] / timed["unpruned", "onnx"]["median_ms"]
    assert f"% MACs, {speedup:.2f}x latency, {(after - top1) * 100:+.1f} points |" in target
    assert "unpruned.onnx" in report and "x unpruned)" in report
    train = next(line for line in report.splitlines() if line.startswith("chansearch train mobilenet_v2_cifar"))
    assert "--lr 0.005" in train and "--epochs 1 " in train  # the transfer's settings, not train's defaults
    again = run_cli("run", recipe)
    assert again.returncode == 0 and "transfer: done earlier, skipped" in again.stdout
