"""`chansearch`: the command line. Each command parses its flags (generated from the stage's
settings model), loads what it names, calls one function of the stage API and prints."""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from compress.app import commands
from compress.app.flags import add_flags, word_for_cli
from compress.errors import CompressError
from compress.logs import quiet_runtimes, show_notes
from compress.settings import (DataSettings, ExportSettings, FinetuneSettings, HeldOutScoring, LatencySettings,
                               LutSettings, ModelSettings, PruneSettings, SearchSettings, SupernetSettings,
                               TrainSettings)

EPILOG = ("TARGET is a zoo name (`chansearch models`), a model source (torchvision:resnet50, timm:efficientnet_lite0, "
          "path/to/file.py:factory, package.module:factory) or a compress checkpoint (.pt).")
DATA_HELP = "cifar10:DIR, imagefolder:DIR, npz:FILE or synthetic:N"


EXAMPLES = {  # each command's help ends with these
    "run": ["chansearch run recipes/quickstart.yaml", "chansearch run recipes/quickstart.yaml finetune.epochs=2",
            "chansearch run recipes/quickstart.yaml --print-config"],
    "models": ["chansearch models", "chansearch models --json"],
    "profile": ["chansearch profile mobilenet_v2 --input-size 224", "chansearch profile half.pt --json"],
    "prune": ["chansearch prune model.pt --macs 50% --data cifar10:../shared/data/cifar10 -o half.pt",
              "chansearch prune model.pt --latency 60% --runtime tflite --int8 --data cifar10:../shared/data/cifar10 "
              "-o fast.pt",
              "chansearch prune model.pt --macs 60% --params 1.2M --data imagefolder:/data/train -o small.pt",
              "chansearch prune mobilenet_v2_cifar --width 0.75 --importance l2 -o w075.pt"],
    "eval": ["chansearch eval half.pt --data cifar10:../shared/data/cifar10"],
    "export": ["chansearch export half.pt --format tflite -o half.tflite",
               "chansearch export half.pt --format tflite --int8 --calib-data cifar10:../shared/data/cifar10 "
               "-o half_int8.tflite"],
    "latency": ["chansearch latency half.tflite --threads 2", "chansearch latency half.tflite --budget-ms 4",
                "chansearch latency half.tflite --device adb"],
    "train": ["chansearch train mobilenet_v2 --pretrained torchvision --num-classes 10 --input-size 224 "
              "--data cifar10:../shared/data/cifar10 --epochs 1 --lr 0.01 -o runs/teacher",
              "chansearch train --resume runs/teacher"],
    "finetune": ["chansearch finetune half.pt --data cifar10:../shared/data/cifar10 --epochs 3 --teacher model.pt "
                 "-o half_ft.pt", "chansearch finetune --resume half_ft_run"],
    "supernet": ["chansearch supernet model.pt --data cifar10:../shared/data/cifar10 --epochs 1 -o runs/sn"],
    "search": ["chansearch search runs/sn --method greedy --macs 50%,30%"],
    "lut": ["chansearch lut runs/sn --runtime tflite --threads 1 -o lut.json",
            "chansearch lut mobilenet_v2 --runtime tflite --int8 --check 50 -o lut_int8.json"],
    "extract": ["chansearch extract runs/sn --budget 30% -o net30.pt",
                "chansearch extract runs/sn --budget 30% --teacher model.pt -o net30.pt"],
}


class _Help(argparse.HelpFormatter):
    """Shows every flag's default (0 included), unless there is none or the help already says
    it; keeps the examples' lines as they are written."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.default is not None and action.default is not False and action.default is not argparse.SUPPRESS
                and "default" not in text and action.option_strings):
            text += " (default: %(default)s)"
        return text

    def _fill_text(self, text, width, indent):
        prose, _, examples = text.partition("\nExamples:\n")
        filled = super()._fill_text(prose, width, indent)
        return filled + ("\n\nExamples:\n" + examples if examples else "")


def _formatter(prog):
    return _Help(prog, max_help_position=32)


def _model_args(p: argparse.ArgumentParser, pretrained: bool = True, resumable: bool = False) -> None:
    p.add_argument("target", metavar="TARGET", nargs="?" if resumable else None,
                   help="zoo name, model source or checkpoint path" + (" (not with --resume)" if resumable else ""))
    add_flags(p, ModelSettings, skip=("name",) if pretrained else ("name", "pretrained"))


# ---- the parser -----------------------------------------------------------------------------
def _run_flags(p: argparse.ArgumentParser, out: str, what: str) -> None:
    p.add_argument("-o", "--output", "--out", dest="out", default=out, help=f"run folder to write: {what}")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue this run folder with its own settings")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def _training_flags(p: argparse.ArgumentParser, settings: type, skip: tuple[str, ...] = ()) -> None:
    p.add_argument("--data", metavar="SPEC", help=f"{DATA_HELP} (required)")
    p.add_argument("--teacher", default=None, metavar="TARGET", help="distill from this zoo model or checkpoint")
    add_flags(p, DataSettings, skip=("spec",), title="data")
    add_flags(p, settings, skip=skip, title="training")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chansearch", formatter_class=_formatter,
        description="Compress CNNs for edge devices: channel spaces, pruning, supernets, search, export.",
        epilog=EPILOG)
    parser.add_argument("--verbose", action="store_true", help="show the runtimes' own log lines (TensorFlow, "
                        "absl, XNNPACK) and library warnings")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help: str, epilog: str | None = EPILOG) -> argparse.ArgumentParser:
        examples = "\nExamples:\n" + "\n".join(f"  {line}" for line in EXAMPLES[name])
        return sub.add_parser(name, help=help, formatter_class=_formatter, epilog=(epilog or "") + examples)

    for add in (_add_run, _add_model_commands, _add_file_commands, _add_training_commands, _add_search_commands):
        add(command)
    return parser


def _add_run(command) -> None:
    p = command("run", "run a YAML recipe end to end (resumable; torchrun-ready)",
                "Re-running the same command resumes: finished stages are skipped, an interrupted one continues, a "
                "stage whose settings changed runs again with those after it. Exit status 3 when a parity or latency "
                "check fails (after writing report.md).")
    p.add_argument("recipe", metavar="RECIPE.yaml", help="recipe file (see recipes/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override recipe keys, e.g. finetune.epochs=2")
    p.add_argument("--print-config", action="store_true", help="print the resolved recipe with every default, then exit")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    p.set_defaults(func=commands.cmd_run)


def _add_model_commands(command) -> None:
    p = command("models", "list the zoo models with MACs and params", None)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=commands.cmd_models)

    p = command("profile", "MACs, params and channel groups of a model")
    _model_args(p)
    p.add_argument("--divisor", type=int, default=8, help="width divisor of the channel space")
    p.add_argument("--json", action="store_true", help="print one JSON object (macs, params, groups)")
    p.set_defaults(func=commands.cmd_profile)

    p = command("prune", "prune a model to budgets (MACs, params, measured latency), a channel config or a width",
                "--latency prunes until the exported file, timed on --runtime with --threads (--int8: the int8 "
                "file), runs within 5%% under the budget. Its latency model is built once per machine (a few "
                "minutes) and cached under ~/.cache/compress (COMPRESS_CACHE).")
    _model_args(p)
    how = p.add_mutually_exclusive_group()
    how.add_argument("--config", metavar="FILE.json", help="channel config: group name -> width")
    how.add_argument("--macs", metavar="150M", help="MAC budget (150M, 1.2G, 50%% of the model); with --params, "
                     "both are met")
    how.add_argument("--width", type=float, metavar="0.75", help="uniform width multiplier")
    p.add_argument("--params", metavar="1.2M", help="parameter budget (1.2M, 40%% of the model)")
    p.add_argument("--latency", metavar="3.5ms", help="latency budget (3.5ms, or 60%% of the unpruned file's measured "
                   "time), measured on --runtime; with --macs/--params, all are met")
    p.add_argument("--latency-model", metavar="FILE.json", help="latency model from `chansearch lut` (default: this "
                   "machine's cached one, built when missing)")
    add_flags(p, PruneSettings)
    add_flags(p, LutSettings, skip=("check",), title="the clock a --latency budget is measured on")
    p.add_argument("--data", metavar="SPEC", help="training images to rank channels on (--importance auto/energy) "
                   "and to refit the pruned layers on (--reconstruct-images of them; or re-estimate BN on "
                   "--recal-images); without it channels are ranked by weight magnitude and nothing is refitted")
    p.add_argument("-o", "--output", required=True, type=Path, help="output checkpoint (.pt)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=commands.cmd_prune)

    p = command("eval", "top-1/top-5 accuracy and loss on a data set")
    _model_args(p)
    p.add_argument("--data", required=True, metavar="SPEC", help=DATA_HELP)
    p.add_argument("--batch-size", type=int, default=256, help="images per batch")
    p.add_argument("--workers", type=int, default=2, help="data loader processes")
    p.add_argument("--images", type=int, default=0, help="evaluate this many images picked at random with --seed "
                   "(0 = all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --images pick")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--json", action="store_true", help="print JSON with top1, top5, loss")
    p.set_defaults(func=commands.cmd_eval)


def _add_file_commands(command) -> None:
    p = command("export", "export to ONNX or TFLite (float/int8) and check parity with PyTorch")
    _model_args(p)
    p.add_argument("--format", required=True, choices=["onnx", "tflite"], help="output format")
    p.add_argument("-o", "--output", required=True, type=Path, help="output file (.onnx / .tflite)")
    p.add_argument("--calib-data", metavar="SPEC", help="real images: training split calibrates static int8, "
                   "evaluation split checks parity and accuracy (default parity input: random)")
    add_flags(p, ExportSettings)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=commands.cmd_export)

    p = command("latency", "measure latency of an .onnx/.tflite file, here or on a phone; budget check",
                "Exit status 3 when the median is over --budget-ms (for CI pipelines).")
    p.add_argument("model", metavar="MODEL_FILE", help=".onnx or .tflite file")
    add_flags(p, LatencySettings)
    p.add_argument("--json", action="store_true", help="print JSON (median_ms, p90_ms, ...)")
    p.set_defaults(func=commands.cmd_latency)


def _add_training_commands(command) -> None:
    p = command("train", "train a model (from scratch or pretrained); torchrun-ready",
                EPILOG + " Resume an interrupted run with --resume RUN_DIR.")
    _model_args(p, resumable=True)
    _training_flags(p, TrainSettings)
    p.add_argument("--from-scratch", action="store_true",
                   help="TARGET is a (pruned) checkpoint: train its architecture from a fresh initialisation "
                        "instead of its weights, as MetaPruning retrains a searched net")
    _run_flags(p, "runs/train", "last.pt, metrics.jsonl, model.pt")
    p.set_defaults(func=commands.cmd_train)

    p = command("finetune", "fine-tune a (pruned) checkpoint, optionally distilling from a teacher")
    p.add_argument("target", metavar="CKPT", nargs="?", help="checkpoint to fine-tune (not with --resume)")
    add_flags(p, ModelSettings, skip=("name", "pretrained", "num_classes", "width_mult", "task"))
    _training_flags(p, FinetuneSettings, skip=("from_scratch", "distill"))
    p.add_argument("-o", "--output", help="fine-tuned checkpoint (.pt; required)")
    p.add_argument("--run-dir", default=None, help="run folder (default: OUTPUT's name + _run)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue this run folder with its own settings")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=commands.cmd_finetune)


def _add_search_commands(command) -> None:
    p = command("supernet", "train a weight-sharing supernet (slimmable or PruningNet); torchrun-ready",
                EPILOG + " Resume an interrupted run with --resume RUN_DIR.")
    _model_args(p, resumable=True)
    add_flags(p, HeldOutScoring, title="held-out scoring after training")
    _training_flags(p, SupernetSettings, skip=("qat_epochs",))
    _run_flags(p, "runs/supernet", "last.pt, metrics.jsonl, supernet.pt")
    p.set_defaults(func=commands.cmd_supernet)

    p = command("search", "search a trained supernet's configs under MAC/param/latency budgets",
                "Results go to RUN_DIR/search-METHOD (search.json, search.csv, search.png). "
                "Running the same command again resumes; nothing is scored twice.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder of `chansearch supernet` (or its supernet.pt)")
    p.add_argument("--macs", help="MAC budgets, comma-separated (150M,100M or 50%%,30%%); - = no limit for that target")
    p.add_argument("--params", help="parameter budget(s)")
    p.add_argument("--latency", "--latency-ms", dest="latency", help="latency budget(s): 3.5ms, or 60%% of the "
                   "unpruned model's measured time on --runtime; predicted by the latency model, each pick then timed "
                   "and searched again under a corrected target where it misses (up to 3 searches)")
    p.add_argument("--lut", metavar="FILE.json", help="latency model of this space from `chansearch lut` (default: "
                   "this machine's cached one, the one `prune --latency` uses; built when missing)")
    p.add_argument("--data", metavar="SPEC", help="the supernet's data at another path (default: as trained)")
    add_flags(p, SearchSettings)
    add_flags(p, LutSettings, skip=("check", "samples"), title="the clock a --latency budget is predicted for")
    p.add_argument("-o", "--output", "--out", dest="out", default=None,
                   help="results folder to write (default: RUN_DIR/search-METHOD)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=commands.cmd_search)

    p = command("lut", "latency model of a channel space on a runtime (for --latency budgets)",
                "TARGET is a zoo name, an unpruned checkpoint, or a `chansearch supernet` run folder (its space is "
                "used). Whole models at sampled configs are exported and timed, and the time of every config "
                "fitted from the work of its layers. Build it on the machine the model will run on. It is cached "
                "per machine and clock under ~/.cache/compress (COMPRESS_CACHE), the model `prune --latency` and "
                "`search --latency` use: a second call writes the cached one (--rebuild times it anew, and so does "
                "--check, which then scores it on random configs).")
    _model_args(p, pretrained=False)
    add_flags(p, LutSettings)
    p.add_argument("--backend", dest="runtime", choices=("tflite", "onnxruntime"), help=argparse.SUPPRESS)
    p.add_argument("--divisor", type=int, default=8, help="width divisor of the space (zoo/checkpoint TARGET)")
    p.add_argument("--min-width", type=float, default=0.25, help="smallest width ratio (zoo/checkpoint TARGET)")
    p.add_argument("-o", "--output", required=True, help="latency model file (.json)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=commands.cmd_lut)

    p = command("extract", "materialize a searched config as a standalone pruned checkpoint", None)
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder of `chansearch supernet`")
    p.add_argument("--budget", "--target", dest="target", metavar="BUDGET",
                   help="which budget of the search: its label or MAC target (e.g. 150M)")
    p.add_argument("--search", default=None, help="search folder (default: the one RUN_DIR/search-* folder)")
    p.add_argument("--teacher", type=Path, default=None,
                   help="the unpruned checkpoint the supernet was trained from: cut the searched widths from its "
                        "weights the way `prune --data` does (refit included) instead of taking the supernet's")
    p.add_argument("-o", "--output", required=True, type=Path, help="output checkpoint (.pt)")
    p.set_defaults(func=commands.cmd_extract)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "command", None) == "run" and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra  # KEY=VALUE overrides given after the flags
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    debug = bool(os.environ.get("COMPRESS_DEBUG"))
    if not (debug or args.verbose):
        quiet_runtimes()
    show_notes()
    try:
        with warnings.catch_warnings():
            if not (debug or args.verbose):  # library deprecation chatter is noise to a CLI user
                warnings.filterwarnings("ignore", category=DeprecationWarning)
                warnings.filterwarnings("ignore", category=FutureWarning)
            return args.func(args) or 0
    except CompressError as exc:
        print(f"chansearch {args.command}: error: {word_for_cli(str(exc), set(vars(args)))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"chansearch {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader (`| head`) went away; nothing more to say
        return 0
    except Exception as exc:  # an internal bug: one clear paragraph, traceback only on request
        if debug:
            raise
        print(f"chansearch {args.command}: internal error: {type(exc).__name__}: {exc}. This is a bug in "
              "compress; rerun with COMPRESS_DEBUG=1 for the traceback and report it.", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
