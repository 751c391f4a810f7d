"""Post-training int8 against quantization-aware recovery, side by side.

For each checkpoint (with the model it is distilled from): its float TFLite file; its static
int8 file as `chansearch export --int8` makes it (post-training quantization, PTQ); the same
after N recovery steps in float (so the steps themselves are not what the next row is credited
for); and after the same N steps quantization-aware (`finetune --qat-epochs 1`: fake-quantized
weights and activations). Each int8 file is compared with its own float model: top-1
agreement, top-1 of both on labelled test images, size, and latency at 1 and 2 threads against
the float file (interleaved rounds, same run).

    python benchmarks/bench_qat.py --model runs/quickstart/finetune/macs50pct.pt:runs/quickstart/transfer/model.pt \
        --model runs/quickstart/transfer/model.pt
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

from bench_int8 import time_all
from common import CIFAR, write_section
from compress import load
from compress.data.specs import sample_labelled
from compress.export import export_tflite
from compress.logs import quiet_runtimes
from compress.settings import DataSettings, ExportSettings, FinetuneSettings
from compress.training.loop import fit

SIZES = {"cpu": dict(steps=100, eval_images=500, calib_images=200, batch_size=64),
         "gpu": dict(steps=1000, eval_images=10000, calib_images=1000, batch_size=128)}


def recovered(model, teacher, args, qat: bool, run_dir: Path):
    """`model` after `args.steps` distilled steps, quantization-aware or in float."""
    settings = FinetuneSettings(epochs=1, qat_epochs=int(qat), steps_per_epoch=args.steps, lr=args.lr,
                                warmup_epochs=0.05, kd_weight=0.7, seed=args.seed,
                                block_steps=0)  # the steps are what is compared, as the quickstart runs them
    data = DataSettings(spec=args.data, batch_size=args.batch_size, workers=args.workers)
    return fit(copy.deepcopy(model), data, settings, run_dir, teacher=teacher, validate=False, quiet=True)


def rows_for(spec: str, args, tmp: Path) -> list[dict]:
    path, _, teacher_path = spec.partition(":")
    model = load(path).eval()
    teacher = load(teacher_path or path).eval()
    card = model.card
    images, labels = sample_labelled(args.data, False, args.eval_images, card.input_size, card.mean, card.std, seed=1)
    calib = sample_labelled(args.data, True, args.calib_images, card.input_size, card.mean, card.std)[0]
    label = f"{Path(path).parent.name}/{Path(path).stem} ({card.input_size} px)"
    variants = [("float", model, None), ("int8 PTQ", model, "int8")]
    for qat, name in ((False, f"int8 PTQ after {args.steps} float steps"), (True, f"int8 QAT, {args.steps} steps")):
        began = time.perf_counter()
        trained = recovered(model, teacher, args, qat, tmp / f"{label}-{qat}".replace("/", "_"))
        print(f"{label} {name}: recovery {time.perf_counter() - began:.0f} s", flush=True)
        variants.append((name, trained.eval(), "int8"))
    rows = []
    for name, net, mode in variants:
        out = tmp / f"{label}_{name}.tflite".replace("/", "_").replace(" ", "_")
        report = export_tflite(net, out, quantize=mode, calib_images=calib if mode else None, images=images,
                               labels=labels, tolerance=None)
        p = report["parity"]
        rows.append({"model": label, "fmt": "tflite", "name": name, "path": out, "report": report})
        print(f"{label} {name}: agreement {p['top1_agreement']:.2%}, top-1 {p['accuracy']['float']:.2%} float -> "
              f"{p['accuracy']['exported']:.2%} file", flush=True)
    return rows


def table(rows: list[dict]) -> list[str]:
    out = ["| model | file | top-1 agreement with its float model | top-1 float -> file | size (x float) | "
           "latency 1 thread ms (x float) | 2 threads ms (x float) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        base = next(b for b in rows if b["model"] == r["model"] and b["name"] == "float")
        p, rep = r["report"]["parity"], r["report"]
        a = p["accuracy"]
        out.append(f"| {r['model']} | {r['name']} | {p['top1_agreement']:.1%} | {a['float']:.1%} -> "
                   f"{a['exported']:.1%} | {rep['bytes'] / 1e6:.2f} MB ({rep['bytes'] / base['report']['bytes']:.2f}x) "
                   f"| {r['ms1']:.2f} ({r['ms1'] / base['ms1']:.2f}x) | {r['ms2']:.2f} ({r['ms2'] / base['ms2']:.2f}x) |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, metavar="CKPT[:TEACHER]",
                    help="a checkpoint, and the model it is distilled from (default: itself); repeat for more")
    ap.add_argument("--data", default=f"cifar10:{CIFAR}", help="data spec: training images recover and calibrate, "
                    "test images measure")
    ap.add_argument("--size", choices=list(SIZES), default="cpu", help="steps and image counts: " + "; ".join(
        f"{k}: {v['steps']} steps, {v['eval_images']} test images" for k, v in SIZES.items()))
    ap.add_argument("--steps", type=int, help="recovery steps (default: the size's)")
    ap.add_argument("--batch-size", type=int, help="recovery batch (default: the size's)")
    ap.add_argument("--eval-images", type=int, help="test images (default: the size's)")
    ap.add_argument("--lr", type=float, default=0.001)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--label", help="write the table to a RESULTS section of its own, named with this label")
    args = ap.parse_args()
    quiet_runtimes()
    for key, value in SIZES[args.size].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for spec in args.model:
            rows += rows_for(spec, args, Path(tmp))
        time_all(rows, args)
        sizes = sorted({r["report"]["input_size"] for r in rows})
        write_section(f"int8: post-training against quantization-aware ({', '.join(map(str, sizes))} px)"
                      + (f": {args.label}" if args.label else ""), "\n".join([
            f"Each checkpoint's float TFLite file and its static int8 files (per-channel int8 weights, int8 "
            f"activations calibrated on {args.calib_images} training images, bias correction on: `export --int8`'s "
            f"defaults): PTQ of the checkpoint as it is; PTQ after {args.steps} distilled steps in float (batch "
            f"{args.batch_size}, lr {args.lr} after a 0.05-epoch warm-up, KD weight 0.7, keep-best on 500 held-out images, as "
            f"the quickstart's fine-tune); QAT: the same "
            f"steps quantization-aware (`--qat-epochs 1`). Agreement and top-1 on {args.eval_images} test images, "
            f"each int8 file against its own float model. Latency: LiteRT (XNNPACK), median of {args.rounds} "
            f"interleaved rounds of {args.runs} runs, ratio to the checkpoint's float file (the CPU and its int8 "
            f"features: the Machine line). "
            f"Recipes fail an int8 file under {ExportSettings().agreement_floor:.0%} agreement.",
            "", *table(rows)]))


if __name__ == "__main__":
    main()
