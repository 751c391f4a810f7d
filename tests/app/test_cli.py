import pytest
import json
import shlex

import numpy as np
import torch

import compress
from conftest import TRAINED, run_cli


def test_models_lists_zoo_with_counts():
    out = run_cli("models", "--json")
    assert out.returncode == 0, out.stderr
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    assert rows["mobilenet_v2"]["macs"] == 300774272 and rows["mobilenet_v1"]["params"] == 4231976
    assert "mobilenet_v3_small_cifar" in rows


def test_profile_json():
    out = run_cli("profile", "mobilenet_v2_cifar", "--width-mult", "0.5", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert isinstance(report["macs"], int) and isinstance(report["params"], int)
    assert report["macs"] == compress.count(compress.build("mobilenet_v2_cifar", width_mult=0.5), 32)[0]
    assert report["groups"][0] == {"name": "features.0.0", "width": 16, "max": 16, "min": 8}


def test_prune_profile_eval_pipeline(tmp_path, cifar_dir):
    out_pt = tmp_path / "half.pt"
    out = run_cli("prune", "mobilenet_v2_cifar", "--macs", "50%", "--strategy", "global",
                  "-o", out_pt, "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert 0.98 * result["macs_before"] / 2 <= result["macs"] <= result["macs_before"] / 2
    profile = json.loads(run_cli("profile", out_pt, "--json").stdout)
    assert profile["macs"] == result["macs"]
    assert {g["name"]: g["width"] for g in profile["groups"]} == result["config"]
    evaluated = run_cli("eval", out_pt, "--data", f"cifar10:{cifar_dir}", "--images", "128",
                        "--batch-size", "64", "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    metrics = json.loads(evaluated.stdout)
    assert 0 <= metrics["top1"] <= 1 and metrics["images"] == 128
    bad = run_cli("eval", out_pt, "--data", f"cifar10:{cifar_dir}", "--images", "-1")
    assert bad.returncode == 2 and "--images -1" in bad.stderr


def test_prune_re_estimates_bn_statistics_on_the_data(tmp_path, cifar_dir):
    """The pruned net's first BN holds the mean and variance of its own conv's outputs over
    the --recal-images training images (averaged over batches of 64, as BN's cumulative
    average does), measured independently here."""
    trained = TRAINED
    data = f"cifar10:{cifar_dir}"
    out = run_cli("prune", trained, "--width", "0.75", "--data", data, "--reconstruct-images", "0", "--recal-images", "128",
                  "--importance", "l1", "-o", tmp_path / "p.pt")
    assert out.returncode == 0 and "BN statistics re-estimated on 128 training images" in out.stdout, out.stderr
    pruned = compress.load(tmp_path / "p.pt")
    stale = compress.stages.prune(compress.load(trained), compress.settings.PruneSettings(), width=0.75).model
    from compress.data.specs import sample_images
    images = sample_images(data, True, 128, 32, pruned.card.mean, pruned.card.std, seed=0)
    with torch.no_grad():
        y = [pruned.features[0][0](half) for half in images.split(64)]  # the stem conv, before its BN
    bn = pruned.features[0][1]
    assert torch.allclose(bn.running_mean, sum(t.mean((0, 2, 3)) for t in y) / 2, atol=1e-4)
    assert torch.allclose(bn.running_var, sum(t.var((0, 2, 3)) for t in y) / 2, rtol=1e-3, atol=1e-4)
    assert not torch.allclose(stale.features[0][1].running_mean, bn.running_mean, atol=1e-3)
    assert torch.equal(stale.features[0][0].weight, pruned.features[0][0].weight)  # same channels kept


def test_prune_with_config_file_and_width(tmp_path):
    model = compress.build("mobilenet_v3_small_cifar")
    space = compress.ChannelSpace.from_model(model, torch.randn(1, 3, 32, 32))
    config = space.sample(np.random.default_rng(3))
    (tmp_path / "c.json").write_text(config.to_json())
    out = run_cli("prune", "mobilenet_v3_small_cifar", "--config", tmp_path / "c.json", "-o", tmp_path / "c.pt")
    assert out.returncode == 0, out.stderr
    assert compress.load(tmp_path / "c.pt").card.config == dict(config)
    out = run_cli("prune", "mobilenet_v1_cifar", "--width", "0.5", "--importance", "bn", "-o", tmp_path / "w.pt")
    assert out.returncode == 0, out.stderr
    assert compress.load(tmp_path / "w.pt").features[0][0].out_channels == 16


def test_eval_npz_spec(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 255, (20, 32, 32, 3), dtype=np.uint8), y=rng.integers(0, 10, 20))
    out = run_cli("eval", "mobilenet_v3_small_cifar", "--data", f"npz:{tmp_path / 'd.npz'}", "--json", "--workers", "0")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["images"] == 20


def _bad(*args):
    out = run_cli(*args)
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr and "error:" in out.stderr
    return out.stderr


def test_bad_inputs_give_clear_errors(tmp_path):
    assert "unknown model 'mobilenet_v9'" in _bad("profile", "mobilenet_v9")
    (tmp_path / "bad.json").write_text("{not json")
    assert "not valid JSON" in _bad("prune", "mobilenet_v2_cifar", "--config", tmp_path / "bad.json", "-o", tmp_path / "x.pt")
    (tmp_path / "unknown.json").write_text(json.dumps({"features.99": 8}))
    assert "unknown group(s) 'features.99'" in _bad(
        "prune", "mobilenet_v2_cifar", "--config", tmp_path / "unknown.json", "-o", tmp_path / "x.pt")
    assert "below the smallest config" in _bad("prune", "mobilenet_v2_cifar", "--macs", "1M", "-o", tmp_path / "x.pt")
    assert "not a MAC count" in _bad("prune", "mobilenet_v2_cifar", "--macs", "150Q", "-o", tmp_path / "x.pt")
    # a budget above the model (150%, or 100G typed for 100M) names the model's own figure
    for typo in ("150%", "100G"):
        assert "above the unpruned model's own 87.98M macs" in _bad(
            "prune", "mobilenet_v2_cifar", "--macs", typo, "-o", tmp_path / "x.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"\x00" * 100)
    assert "corrupt.pt" in _bad("profile", tmp_path / "corrupt.pt")
    assert "does not exist" in _bad("eval", "mobilenet_v2_cifar", "--data", f"cifar10:{tmp_path / 'nowhere'}")
    assert "bad data spec" in _bad("eval", "mobilenet_v2_cifar", "--data", "mnist:/tmp")
    assert not (tmp_path / "x.pt").exists()


def test_help_documents_every_command():
    out = run_cli("--help")
    for command in ("models", "profile", "prune", "eval"):
        assert command in out.stdout
    prune_help = run_cli("prune", "--help").stdout
    for flag in ("--config", "--macs", "--width", "--pretrained", "--importance", "--strategy",
                 "--divisor", "--num-classes", "--input-size", "--output"):
        assert flag in prune_help


def test_settings_out_of_range_are_refused_before_any_work(tmp_path):
    out = run_cli("prune", "mobilenet_v2_cifar", "--width", "0.5", "--input-size", "0", "-o", tmp_path / "x.pt")
    assert out.returncode == 2 and "--input-size 0: Input should be greater than or equal to 8" in out.stderr
    assert not (tmp_path / "x.pt").exists() and "Traceback" not in out.stderr
    out = run_cli("train", "mobilenet_v3_small_cifar", "--data", "synthetic:32", "--lr", "-1", "--out", tmp_path / "r")
    assert out.returncode == 2 and "--lr -1.0: Input should be greater than 0" in out.stderr
    assert not (tmp_path / "r").exists()


def test_a_run_folder_in_use_is_refused(tmp_path):
    from compress.files import RunLock
    with RunLock(tmp_path / "run"):  # another process is writing this run
        out = run_cli("train", "mobilenet_v3_small_cifar", "--input-size", "16", "--data", "synthetic:32",
                      "--batch-size", "16", "--epochs", "1", "--workers", "0", "--out", tmp_path / "run")
    assert out.returncode == 2 and "is in use by another running process" in out.stderr
    assert not (tmp_path / "run" / "args.json").exists() and not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.slow
def test_runtime_log_lines_stay_out_of_the_terminal(tmp_path):
    """TensorFlow/absl/XNNPACK lines are written by native code to the process's stderr: a new process shows them."""
    out = run_cli("export", "mobilenet_v3_small_cifar", "--input-size", "16", "--format", "tflite",
                  "-o", tmp_path / "m.tflite", fresh=True)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    loud = run_cli("--verbose", "latency", tmp_path / "m.tflite", "--runs", "3", fresh=True)
    assert loud.returncode == 0 and "XNNPACK" in loud.stderr  # what the export above kept quiet


def test_a_transfer_says_its_new_head_in_one_plain_line(tmp_path):
    """Pretrained weights with another class count: a new head is what a transfer asks for,
    so it is one line of the run's output, not a Python warning with a source path."""
    from compress.models import build
    torch.save(build("mobilenet_v3_small_cifar", num_classes=100).state_dict(), tmp_path / "w.pth")
    out = run_cli("prune", "mobilenet_v3_small_cifar", "--pretrained", tmp_path / "w.pth", "--num-classes", "10",
                  "--width", "0.5", "-o", tmp_path / "p.pt", fresh=True)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    note = f"{tmp_path / 'w.pth'}: new classifier head 'classifier.3' for 10 classes (the weights have 100); " \
        "the backbone is kept."
    assert note in out.stdout.splitlines()


def test_equivalent_commands_reproduce_the_settings():
    """What a run report prints, parsed by the CLI, gives back the very settings the run used."""
    from compress.app.cli import build_parser
    from compress.app.flags import command_line, settings_from
    from compress.settings import (DataSettings, ExportSettings, FinetuneSettings, LatencySettings, PruneSettings,
                                   SearchSettings, SupernetSettings)
    cases = [
        ("supernet", ["mobilenet_v2_cifar"], [DataSettings(spec="synthetic:8", batch_size=64),
                                              SupernetSettings(method="pruningnet", lr=0.2, channels_last=False,
                                                               distill=False, holdout=100, epochs=3)]),
        ("finetune", ["x.pt"], [DataSettings(spec="synthetic:8", workers=0), FinetuneSettings(lr=0.03, kd_weight=0.7)]),
        ("search", ["runs/s"], [SearchSettings(method="greedy", greedy_step=0.25, recal_images=64, seed=3)]),
        ("prune", ["mobilenet_v2_cifar"], [PruneSettings(strategy="global", importance="bn", divisor=4)]),
        ("export", ["x.pt"], [ExportSettings(int8=True, calib_images=50, min_agreement=0.98)]),
        ("latency", ["x.tflite"], [LatencySettings(threads=2, runs=7, budget_ms=3.5, xnnpack=False)]),
    ]
    extra = {"supernet": ["--data", "synthetic:8"], "finetune": ["--data", "synthetic:8"], "search": ["--macs", "50%"],
             "prune": ["--macs", "50%", "-o", "p.pt"], "export": ["--format", "tflite", "-o", "x.tflite"]}
    for command, positionals, settings in cases:
        line = command_line(command, positionals, settings, extra.get(command))
        args = build_parser().parse_args(shlex.split(line)[1:])
        for s in settings:
            values = {"spec": args.data} if isinstance(s, DataSettings) else {}
            if isinstance(s, SearchSettings):
                values["targets"] = s.targets
            if isinstance(s, ExportSettings):
                values["formats"] = s.formats
            assert settings_from(type(s), args, **values) == s, line


def test_every_command_shows_examples_that_parse_and_every_default():
    """Walks the parser: each subcommand's help ends with examples, each example is a command
    line the parser accepts, and every flag with a default shows it (0 and 0.0 included)."""
    import argparse
    import shlex
    from compress.app.cli import EXAMPLES, build_parser
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) == set(EXAMPLES)
    for name, sub in commands.items():
        text = sub.format_help()
        assert "Examples:\n" in text, name
        for line in EXAMPLES[name]:
            assert f"  {line}\n" in text + "\n", line
            assert parser.parse_args(shlex.split(line)[1:]).command == name, line
        flat = " ".join(text.split())
        for action in sub._actions:
            if action.option_strings and action.default is not None and action.default is not False \
                    and action.default is not argparse.SUPPRESS and "default" not in (action.help or ""):
                assert f"(default: {action.default})" in flat, (name, action.dest)
    assert "--seed N random seed (default: 0)" in " ".join(commands["train"].format_help().split())
    for name in ("prune", "export", "train", "finetune", "supernet", "search", "lut", "extract"):  # what writes
        assert any(a.option_strings[:2] == ["-o", "--output"] for a in commands[name]._actions), name


def test_the_reference_pages_are_what_the_code_generates():
    """docs/cli.md and docs/recipe.md are generated from the parser and the settings: a flag or a
    recipe key added, renamed or re-described without regenerating them fails here."""
    from compress.app.reference import DOCS, cli_reference, recipe_reference
    for name, text in (("cli.md", cli_reference()), ("recipe.md", recipe_reference())):
        assert (DOCS / name).read_text() == text, f"docs/{name} is stale: run `python -m compress.app.reference`"
    assert "`finetune.lr_trial`" in recipe_reference() and "chansearch prune" in cli_reference()
