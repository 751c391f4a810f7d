"""Comparing an exported model's outputs with PyTorch's on the same inputs."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from compress.models.card import card_of
from compress.errors import CheckFailed, CompressError
from compress.export.outputs import named_tensors
from compress.training.restoration import psnr
from compress.training.retrieval import nearest
from compress.training.tasks import SURE_SCORE, mean_average_precision, miou, sure


def reference_inputs(model: nn.Module, images: torch.Tensor | None, count: int = 8, seed: int = 0) -> torch.Tensor:
    """The images to compare on: real ones when given, else a fixed random batch."""
    if images is not None:
        return images.float()
    size = card_of(model).input_size
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


RTOL = 1e-4


def compare(name: str, reference: np.ndarray, exported: np.ndarray, tolerance: float | None,
            rtol: float = RTOL, labels: torch.Tensor | None = None, task: str = "classify") -> dict:
    """Max absolute logit difference and top-1 agreement (and, with `labels`, the top-1
    accuracy of both); for a segmenter, the agreement is the mIoU of the file's per-pixel
    predictions taking the float model's as the truth; for an embedding (`task` embed), the
    mean cosine similarity, beside how often each image's nearest other image is the same; for
    an output image (`task` restore), the SSIM of the file's images against the float model's,
    with their PSNR beside it. Raises
    CheckFailed when the difference exceeds `tolerance` + `rtol` x the largest |logit|: float32
    runtimes sum in different orders, so logits of size 20 legitimately differ by ~1e-4."""
    diff = float(np.abs(reference - exported).max())
    scale = float(np.abs(reference).max())
    report = {"max_abs_diff": diff, "max_abs_logit": scale, "images": int(len(reference))}
    if task == "segment":  # the gate reads the mIoU of the file's pixels against the float model's
        ref, got = reference.argmax(1).ravel(), exported.argmax(1).ravel()
        classes = reference.shape[1]
        scores = miou(torch.from_numpy(np.bincount(ref * classes + got, minlength=classes * classes)
                                       .reshape(classes, classes)))
        report.update(top1_agreement=scores["miou"], agreement_of="mIoU", pixel_agreement=scores["pixel_acc"])
        labels = None
    elif task == "embed":  # the gate reads the mean cosine: nearest neighbours of close embeddings swap on a rounding
        ref, got = (nn.functional.normalize(torch.from_numpy(a).float(), dim=1) for a in (reference, exported))
        report.update(top1_agreement=float((ref * got).sum(1).mean()), agreement_of="mean cosine",
                      nearest_agreement=float(nearest(ref, ref, 0).eq(nearest(got, got, 0)).float().mean()))
        labels = None
    elif task == "restore":  # a fraction like the others, so one floor serves; PSNR says how close in dB
        from torchmetrics.functional.image import structural_similarity_index_measure
        ref, got = (torch.from_numpy(a).float().clamp(0, 1) for a in (reference, exported))
        report.update(top1_agreement=float(structural_similarity_index_measure(got, ref, data_range=1.0)),
                      agreement_of="SSIM", psnr_db=float(psnr(got, ref).mean()))
        labels = None
    else:
        report["top1_agreement"] = float((reference.argmax(1) == exported.argmax(1)).mean())
    agree = report["top1_agreement"]
    if labels is not None:
        truth = labels.numpy()
        report["accuracy"] = {"float": float((reference.argmax(1) == truth).mean()),
                              "exported": float((exported.argmax(1) == truth).mean())}
    if tolerance is not None:
        limit = tolerance + rtol * scale
        report["limit"] = limit
        if not diff <= limit:
            raise CheckFailed(f"{name}: outputs differ from PyTorch by up to {diff:.3g} (allowed {limit:.3g} = "
                              f"tolerance {tolerance:g} + {rtol:g} x largest |logit| {scale:.3g}; top-1 agreement "
                              f"{agree:.1%} on {len(reference)} images). The file was written; inspect it, or "
                              "raise `tolerance` if this precision is acceptable.", report)
    return report


def check_agreement(name: str, report: dict, floor: float, mode: str) -> None:
    """CheckFailed (carrying `report`) when a quantized file's agreement with the float model
    (top-1, or the task's own: mIoU, mean cosine, SSIM, mAP@50) is under `floor`."""
    p = report["parity"]
    if p["top1_agreement"] < floor:
        accuracy = p.get("accuracy")
        drop = (f"; top-1 accuracy {accuracy['float']:.1%} float, {accuracy['exported']:.1%} {mode}"
                if accuracy else "")
        what = (f"top-1 agrees with the float model on {p['top1_agreement']:.1%} of" if "agreement_of" not in p
                else f"{p['agreement_of']} against the float model is {p['top1_agreement']:.1%} on")
        raise CheckFailed(f"{name}: {mode} {what} {p['images']} images, under the "
                          f"required {floor:.1%}{drop}. The file was written. "
                          "Calibrate on more (and more representative) images (`calib_images`), keep the most "
                          "sensitive ops in float (`keep_float`), or lower `min_agreement`.", report)


def output_names(model: nn.Module, x: torch.Tensor, quantize: str | None) -> list[str]:
    """The names of `model`'s output tensors ("logits" for a classifier). A quantized file is
    checked against the float model by the task's own fidelity: a classifier's top-1, a
    segmenter's per-pixel predictions (its first output, "out"), an embedding's direction, an
    output image's SSIM, a detector's decoded detections."""
    with torch.no_grad():
        names = [name for name, _ in named_tensors(model.eval()(x))]
    if not names:
        raise CompressError(f"{type(model).__name__} returns no tensor (a tensor, or a dict, list or tuple of them) "
                            "for an image batch; there is nothing to export.")
    task = getattr(getattr(model, "card", None), "task", "classify")
    if quantize and task == "detect" and not callable(getattr(model, "detections", None)):
        raise CompressError(f"`{quantize}` export of a detector checks its detections against the float model's: "
                            f"{type(model).__name__} has no `detections(outputs, images)` method. Export it in float.")
    if quantize and len(names) != 1 and task in ("classify", "embed", "restore"):
        raise CompressError(f"`{quantize}` export checks one output against the float model (a classifier's top-1, an "
                            f"embedding's cosine, an image's SSIM); this {task} model returns {len(names)} outputs "
                            f"({', '.join(names[:6])}). Export it in float.")
    return names


def compare_outputs(name: str, references: list[np.ndarray], exported: list[np.ndarray], names: list[str],
                    tolerance: float | None, labels: torch.Tensor | None = None, task: str = "classify",
                    model: nn.Module | None = None, images: torch.Tensor | None = None) -> dict:
    """`compare` for each output of a model (a segmenter's "out" and "aux", a detector's head
    outputs); one output gives `compare`'s report as it is. Several give the report of the one
    furthest from PyTorch, relative to its scale, with every output's report under "outputs",
    and the task's agreement: a segmenter's mIoU on its first output, a detector's mAP of the
    file's detections (decoded by `model.detections` on `images`) against the float model's."""
    if len(exported) != len(references):
        raise CheckFailed(f"{name}: the file has {len(exported)} outputs, PyTorch's model {len(references)} "
                          f"({', '.join(names)}).")
    if len(names) == 1 and task != "detect":
        return compare(name, references[0], exported[0], tolerance, labels=labels, task=task)
    reports = {key: compare(f"{name} output '{key}'", ref, got, tolerance)
               for key, ref, got in zip(names, references, exported)}
    worst = max(reports, key=lambda k: reports[k]["max_abs_diff"] / max(reports[k]["max_abs_logit"], 1e-30))
    report = {**reports[worst], "output": worst, "outputs": reports}
    if task == "segment":
        gated = compare(name, references[0], exported[0], None, task=task)
        report.update(top1_agreement=gated["top1_agreement"], agreement_of="mIoU", gated_output=names[0],
                      pixel_agreement=gated["pixel_agreement"])
    elif task == "detect" and callable(getattr(model, "detections", None)):
        report.update(detection_agreement(model, names, references, exported, images))
    return report


@torch.no_grad()
def detection_agreement(model: nn.Module, names: list[str], references: list[np.ndarray],
                        exported: list[np.ndarray], images: torch.Tensor) -> dict:
    """The file's detections scored taking the float model's as the truth: those scoring at
    least SURE_SCORE, or half the best score when none does (a detector still early in
    training); the float model finding nothing there leaves nothing to agree on (0). The gate
    reads mAP@50 (the same objects found, in the same places), as a classifier's reads top-1;
    mAP@[.5:.95] beside it also counts the boxes' last pixels, which int8 rounding moves."""
    def found(arrays):
        return model.eval().detections({key: torch.from_numpy(a).float() for key, a in zip(names, arrays)}, images)
    reference, got = found(references), found(exported)
    best = max((float(d["scores"].max()) for d in reference if len(d["scores"])), default=0.0)
    floor = SURE_SCORE if best >= SURE_SCORE else best / 2
    truth = sure(reference, floor)
    metric = mean_average_precision()
    metric.update(got, truth)
    scores = metric.compute() if best > 0 else {"map": 0.0, "map_50": 0.0}
    return {"top1_agreement": max(float(scores["map_50"]), 0.0), "agreement_of": "mAP@50",
            "map_agreement": max(float(scores["map"]), 0.0),
            "reference_boxes": int(sum(len(t["boxes"]) for t in truth)), "reference_score": floor}


@torch.no_grad()
def torch_outputs(model: nn.Module, images: torch.Tensor) -> list[np.ndarray]:
    """Every output tensor of `model` on `images`, in the order the exported files hold them."""
    return [t.float().numpy() for _, t in named_tensors(model.eval()(images))]
