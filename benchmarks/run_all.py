"""Re-run the benchmarks; each writes its table into benchmarks/RESULTS.md.

`--quick` runs the fast ones at their smallest size (minutes on 2 CPU cores); without it,
every benchmark runs at `--size` (cpu by default; the training ones take hours on a CPU).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PRETRAINED = HERE.parents[1] / "shared" / "pretrained" / "mobilenet_v2_imagenet.pth"
QUICK = [["bench_macs.py"], ["bench_supernet_speed.py", "--size", "quick"],
         ["bench_lut.py", "--size", "quick"]]


def full(size: str) -> list[list[str]]:
    return [["bench_macs.py"], ["bench_train_overhead.py"], ["bench_export.py"],
            ["bench_supernet_speed.py", "--size", size], ["bench_lut.py", "--size", size],
            ["bench_reference.py", "--size", size],
            ["bench_search_quality.py", "--size", size, "--method", "slimmable"],
            ["bench_search_quality.py", "--size", size, "--method", "pruningnet"],
            ["bench_int8.py", "--size", size, "--pretrained", str(PRETRAINED)]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="only the fast benchmarks, at their smallest size")
    ap.add_argument("--size", default="cpu", choices=["cpu", "gpu"], help="size of the full runs")
    args = ap.parse_args()
    for script, *rest in QUICK if args.quick else full(args.size):
        print(f"== {script} {' '.join(rest)}", flush=True)
        subprocess.run([sys.executable, str(HERE / script), *rest], check=True, cwd=HERE.parent)


if __name__ == "__main__":
    main()
