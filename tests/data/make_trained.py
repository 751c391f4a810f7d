"""Writes mobilenet_v2_cifar_w035_trained.pt, the small trained net the int8 tests quantize
(int8 error only means something on trained weights, whose activations have real ranges):
mobilenet_v2_cifar at width 0.35 trained 4 epochs on the 25,000 CIFAR-10 training images of
../shared/data/cifar10 (55% test top-1; about 10 minutes on 2 cores).

    python tests/data/make_trained.py
"""
from pathlib import Path

import torch

import compress
from compress.settings import DataSettings, TrainSettings
from compress.training.loop import fit

HERE = Path(__file__).resolve().parent
CIFAR = HERE.parents[2] / "shared" / "data" / "cifar10"

if __name__ == "__main__":
    torch.manual_seed(0)
    model = compress.build("mobilenet_v2_cifar", width_mult=0.35)
    fit(model, DataSettings(spec=f"cifar10:{CIFAR}", batch_size=128, workers=2),
        TrainSettings(epochs=4, lr=0.1, label_smoothing=0.0, seed=0), HERE / "make_trained_run", validate=False)
    compress.save_checkpoint(HERE / "mobilenet_v2_cifar_w035_trained.pt", model.eval())
