import contextlib
import io
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "data" / "cifar10"
# a small MobileNetV2 trained on CIFAR-10 (tests/fixtures/make_trained.py)
TRAINED = ROOT / "tests" / "fixtures" / "mobilenet_v2_cifar_w035_trained.pt"


class ResidualNet(nn.Module):
    """A user-defined CNN with a residual connection, not from any zoo."""

    def __init__(self, num_classes: int = 10, size: int = 16, width: int = 16):
        super().__init__()
        w, wide, down = width, 2 * width, 3 * width // 2
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(w, wide, 3, padding=1), nn.BatchNorm2d(wide), nn.ReLU(),
                                  nn.Conv2d(wide, w, 1), nn.BatchNorm2d(w))
        self.down = nn.Sequential(nn.Conv2d(w, down, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(down * (size // 2) ** 2, num_classes)  # flatten of the last map, not a pool

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.body(x))
        return self.head(self.down(x).flatten(1))


@pytest.fixture
def user_net():
    torch.manual_seed(0)
    return ResidualNet().eval()


@pytest.fixture(scope="session", autouse=True)
def _latency_cache(tmp_path_factory):
    """Latency models measured by the tests go to a folder of their own, not the user's cache."""
    os.environ["COMPRESS_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def cifar_dir():
    if not (CIFAR / "test.npz").is_file():
        pytest.skip(f"CIFAR-10 arrays not found at {CIFAR}")
    return CIFAR


def run_cli(*args, cwd=None, env=None, fresh=False):
    """Run `chansearch ARGS` as a user would; returns a CompletedProcess.

    By default in this process (the CLI's own `main`, its output captured): each interpreter
    start costs seconds of imports. `fresh=True` runs `python -m compress` in a new process,
    for what only a process shows: native log lines, signals, bit-exact resume across processes.
    """
    if fresh or env:
        full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
        return subprocess.run([sys.executable, "-m", "compress", *map(str, args)], capture_output=True,
                              text=True, cwd=cwd or ROOT, env=full_env, timeout=600)
    from compress.app.cli import main
    out, err = io.StringIO(), io.StringIO()
    here = os.getcwd()
    os.chdir(cwd or ROOT)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                code = main([str(a) for a in args])
            except SystemExit as exc:  # argparse's own errors
                code = exc.code if isinstance(exc.code, int) else 2
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess(["chansearch", *map(str, args)], code, out.getvalue(), err.getvalue())
