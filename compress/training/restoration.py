"""Image-restoration scores (super-resolution): PSNR and SSIM of the model's output image
against the high-resolution target, both in [0, 1], per image and then averaged, as the SR
literature reports them; with a teacher, the PSNR of the output against the teacher's output
(fidelity)."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def psnr(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [0, 1] (the output clamped to that range, as it is
    saved); capped at 100 dB for identical images."""
    mse = (output.clamp(0, 1) - target).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp(min=1e-10))


class RestoreMeter:
    """PSNR and SSIM (torchmetrics' Gaussian-window SSIM) of each output against its target,
    the L1 loss, and with a teacher the PSNR against its output (`fidelity_psnr`), summed
    across torchrun ranks."""

    def __init__(self, device):
        self.sums = torch.zeros(5, dtype=torch.float64, device=device)  # psnr, ssim, loss, images, fidelity psnr
        self.teacher = False

    def update(self, outputs: torch.Tensor, targets: torch.Tensor, teacher_outputs: torch.Tensor | None = None,
               images: torch.Tensor | None = None) -> None:
        from torchmetrics.functional.image import structural_similarity_index_measure
        outputs, targets = outputs.float(), targets.float()
        ssim = structural_similarity_index_measure(outputs.clamp(0, 1), targets, data_range=1.0, reduction="none")
        fidelity = torch.zeros((), device=outputs.device)
        if teacher_outputs is not None:
            self.teacher = True
            fidelity = psnr(outputs, teacher_outputs.float().clamp(0, 1)).sum()
        loss = nn.functional.l1_loss(outputs, targets, reduction="none").flatten(1).mean(1).sum()
        self.sums += torch.stack([psnr(outputs, targets).sum(), ssim.sum(), loss,
                                  torch.tensor(float(len(targets)), device=outputs.device), fidelity]).double()

    def result(self, distributed_sum: bool) -> dict:
        if distributed_sum and dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.sums)
        total_psnr, ssim, loss, n, fidelity = self.sums.tolist()
        n = max(n, 1.0)
        return {"psnr": total_psnr / n, "ssim": ssim / n, "loss": loss / n, "images": int(n),
                **({"fidelity_psnr": fidelity / n} if self.teacher else {})}
