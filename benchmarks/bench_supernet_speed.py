"""Cost of weight sharing: supernet steps and evaluations against standalone pruned models.

mobilenet_v2_cifar. Every ratio compares timings taken in the same run, in interleaved
rounds (median of rounds), so machine drift does not bias it:

- slimmable: a sandwich step (max, min, 2 random configs) vs the sum of the four pruned
  models' training steps (target <= 1.10x); evaluation at a config vs the pruned model's
  (target <= 1.10x); peak memory of a sandwich step vs the full model's step (<= 1.2x);
  a greedy step's seconds (one trial per group).
- PruningNet: a training step vs the pruned model's at the same config (<= 1.5x), with
  the hypernetworks' share; a candidate evaluation (weight generation + BN recalibration +
  evaluation) vs the pruned model doing the same forward passes (<= 1.25x); the wall time
  of a default evolution search (1,000 candidates, 2,000 + 5,000 images each), from the
  measured cost per candidate.

`--size cpu` (batch 64) for this machine, `--size gpu` (batch 256, CUDA) for a GPU.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

from common import write_section
from compress import build
from compress.search import Evaluator, HeldOut
from compress.supernet import build_supernet, recalibrate_bn
from compress.supernet.slimmable import random_config, sandwich_step
from compress.settings import TrainSettings
from compress.training.loop import standard_step

SIZES = {"cpu": dict(batch=64, rounds=5, steps=3), "gpu": dict(batch=256, rounds=7, steps=10),
         "quick": dict(batch=16, rounds=2, steps=1)}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device, steps: int) -> float:
    fn()  # warm-up
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / steps


def _train_step(model, step, images, labels):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9,
                          fused=True)  # as the training engine runs it

    def run():
        model.train()
        step(model, images, labels, lambda loss: loss.backward())
        opt.step()
        opt.zero_grad(set_to_none=True)
    return run


def _eval_pass(model, images):
    def run():
        model.eval()
        with torch.no_grad():
            model(images)
    return run


def _rounds(fns: dict, device, rounds: int, steps: int) -> dict:
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k].append(_timed(fn, device, steps))
    return {k: statistics.median(v) for k, v in times.items()}


def _peak_rss_mb(which: str, batch: int) -> float:
    """Peak resident memory growth of one training step, in a fresh process."""
    code = f"""
import sys
sys.path.insert(0, 'benchmarks')
from bench_supernet_speed import _peak_child
print(_peak_child({which!r}, {batch}))
"""
    # Tensors above 64 KB get their own mappings, returned to the system when freed, so the
    # resident-size peak is the step's live memory, not what glibc's heap happened to keep.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return float(out.stdout.strip().splitlines()[-1])


def _status_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _peak_child(which: str, batch: int) -> float:
    torch.manual_seed(0)
    model = build("mobilenet_v2_cifar")
    images, labels = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    if which == "sandwich":
        model = build_supernet(model, "slimmable")
        step = sandwich_step(model)
    else:
        step = standard_step(TrainSettings())
    run = _train_step(model, step, images, labels)
    run()  # the optimizer state exists from here on, as in training
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak (VmHWM) to the current resident size
    before = _status_kb("VmRSS")
    run()
    return (_status_kb("VmHWM") - before) / 1024


def _slimmable_rows(p: dict, device: torch.device, images: torch.Tensor, labels: torch.Tensor,
                    plain_step) -> tuple[list, int, float]:
    """The slimmable supernet against the pruned models: rows, and the greedy step's trials and time."""
    rows = []
    supernet = build_supernet(build("mobilenet_v2_cifar"), "slimmable").to(device)
    space = supernet.space
    torch.manual_seed(1)
    configs = [space.max(), space.min(), random_config(space), random_config(space)]
    pruned = [supernet.extract(c).to(device) for c in configs]
    sandwich = _train_step(supernet, sandwich_step(supernet), images, labels)

    def same_configs_sandwich():
        torch.manual_seed(1)  # so the step draws exactly the two random configs the pruned models have
        sandwich()
    fns = {"sandwich": same_configs_sandwich}
    fns.update({f"pruned{i}": _train_step(m, plain_step, images, labels) for i, m in enumerate(pruned)})
    half = space.uniform(0.5)
    half_net = supernet.extract(half).to(device)

    def super_eval():
        supernet.set_config(half)
        _eval_pass(supernet, images)()
    fns.update({"super_eval": super_eval, "pruned_eval": _eval_pass(half_net, images)})
    t = _rounds(fns, device, p["rounds"], p["steps"])
    four = sum(t[f"pruned{i}"] for i in range(4))
    rows.append(("slimmable sandwich step (4 configs) vs the 4 pruned models' steps", t["sandwich"], four, 1.10))
    rows.append(("slimmable evaluation at 0.5x vs the pruned 0.5x model", t["super_eval"], t["pruned_eval"], 1.10))
    if device.type == "cpu":
        mem_s, mem_f = _peak_rss_mb("sandwich", p["batch"]), _peak_rss_mb("full", p["batch"])
        rows.append(("slimmable sandwich step peak memory (MB) vs the full model's step", mem_s, mem_f, 1.2))

    held = HeldOut(torch.utils.data.TensorDataset(images.cpu(), labels.cpu()), p["batch"], p["batch"],
                   batch_size=p["batch"])
    evaluator = Evaluator(supernet, held, device)
    start = time.perf_counter()
    trials = [dict(space.max()) | {g.name: g.widths[-2]} for g in space.groups if len(g.widths) > 1]
    evaluator.score_many(trials)
    greedy_s = time.perf_counter() - start
    return rows, len(trials), greedy_s


def _pruningnet_rows(p: dict, device: torch.device, images: torch.Tensor, labels: torch.Tensor,
                     plain_step) -> tuple[list, dict, list]:
    """The PruningNet against the pruned model: rows, the timings, and its trained parameters."""
    rows = []
    pn = build_supernet(build("mobilenet_v2_cifar"), "pruningnet").to(device)
    config = pn.space.uniform(0.5)
    pn.set_config(config)
    standalone = pn.extract(config).to(device)

    def pn_step_fixed(net, x, y, backward):  # the same config every step, to compare like with like
        pn.set_config(config, track=False)
        loss = nn.functional.cross_entropy(net(x), y, label_smoothing=0.1)
        backward(loss)
        return loss.detach()

    hyper_only = lambda: sum(h(pn._encoding(h))["weight"].sum() for h in pn.hypers.values()).backward()  # noqa: E731
    recal_batches = [images] * 2

    def pn_candidate():
        recalibrate_bn(pn, config, recal_batches, device)
        _eval_pass(pn, images)()

    def plain_candidate():
        standalone.train()
        with torch.no_grad():
            for b in recal_batches:
                standalone(b)
        _eval_pass(standalone, images)()
    t = _rounds({"pn_step": _train_step(pn, pn_step_fixed, images, labels),
                 "pruned_step": _train_step(standalone, plain_step, images, labels), "hyper": hyper_only,
                 "pn_candidate": pn_candidate, "plain_candidate": plain_candidate}, device, p["rounds"], p["steps"])
    params = [q for q in pn.parameters() if q.requires_grad]
    for q in params:
        q.grad = torch.randn_like(q)
    updates = {name: torch.optim.SGD(params, lr=1e-3, momentum=0.9, nesterov=True, weight_decay=5e-4, **kw).step
               for name, kw in (("loop", {"foreach": False}), ("fused", {"fused": True}))}
    t |= _rounds(updates, device, p["rounds"], 1)
    pn.zero_grad(set_to_none=True)
    rows.append(("PruningNet training step vs the pruned model's (same config)", t["pn_step"], t["pruned_step"], 1.5))
    rows.append(("PruningNet candidate (generate + recalibrate + evaluate) vs pruned model", t["pn_candidate"],
                 t["plain_candidate"], 1.25))
    return rows, t, params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=SIZES, default="cpu")
    args = ap.parse_args()
    p = SIZES[args.size]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    images = torch.randn(p["batch"], 3, 32, 32, device=device)
    labels = torch.randint(0, 10, (p["batch"],), device=device)
    plain_step = standard_step(TrainSettings())
    rows, trials, greedy_s = _slimmable_rows(p, device, images, labels, plain_step)
    pn_rows, t, params = _pruningnet_rows(p, device, images, labels, plain_step)
    rows += pn_rows
    hyper_share = t["hyper"] / t["pn_step"]
    per_image = t["pn_candidate"] / (3 * p["batch"])
    evolution_min = 1000 * 7000 * per_image / 60

    table = ["| measurement | supernet | standalone | ratio | target |", "|---|---|---|---|---|"]
    for name, a, b, target in rows:
        unit = "" if "memory" in name else " s"
        fmt = (lambda v: f"{v:.0f}") if "memory" in name else (lambda v: f"{v:.4f}")
        table.append(f"| {name} | {fmt(a)}{unit} | {fmt(b)}{unit} | {a / b:.2f}x | <= {target}x "
                     f"{'ok' if a / b <= target else 'MISSED'} |")
    write_section(f"Supernet speed ({args.size})", "\n".join([
        f"mobilenet_v2_cifar, batch {p['batch']} of 32x32 images on {device.type}; medians of {p['rounds']} "
        f"interleaved rounds of {p['steps']} timed steps (after one warm-up).", "", *table, "",
        f"- Greedy step: {trials} trials (one per group), each BN recalibration on {p['batch']} and evaluation on "
        f"{p['batch']} images: {greedy_s:.1f} s per step ({greedy_s / trials:.2f} s per trial); the cost "
        "grows linearly with the number of groups and with the image counts.",
        f"- PruningNet hypernetworks (weight generation forward + backward alone) take {hyper_share:.0%} of a "
        f"training step at batch {p['batch']}; their share falls as the batch grows.",
        f"- One SGD update of the PruningNet's {sum(q.numel() for q in params) / 1e6:.0f}M parameters: "
        f"{t['loop']:.3f} s with PyTorch's default per-tensor loop, {t['fused']:.3f} s fused "
        f"({t['loop'] / t['fused']:.1f}x; the training engine and the steps above use the fused one).",
        f"- A default evolution search (1,000 candidates, 2,000 recalibration + 5,000 evaluation images each) "
        f"costs about {evolution_min:.0f} minutes here at the measured {per_image * 1e3:.2f} ms per image "
        "(extrapolated from the candidate timing, not run end to end)."]))

if __name__ == "__main__":
    main()
