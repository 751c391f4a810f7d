"""A torchvision one-stage detector (SSD, SSDlite, RetinaNet, FCOS) up to its raw head
outputs: the network compress prunes, trains, evaluates and exports for detection.

torchvision's detectors resize and normalise inside `forward` and end in data-dependent
post-processing (box decoding, per-class top-k, NMS) that an exported file cannot hold as
plain tensor ops. `RawDetector` takes images already resized to its input size and normalised
with its card's mean/std, and returns the head's outputs, every pyramid level's locations
concatenated: `cls_logits` (N, locations, classes) and `bbox_regression` (N, locations, 4),
and FCOS's `bbox_ctrness` (N, locations, 1). The exported ONNX and TFLite files compute exactly
those; decoding against the anchors and NMS (`detections`) run outside the file, with
torchvision's own post-processing, and the losses are torchvision's own.
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision import models as tvm
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.fcos import FCOS, FCOSHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNet
from torchvision.models.detection.ssd import SSD
from torchvision.ops import boxes as box_ops

FAMILIES = (SSD, RetinaNet, FCOS)


def raw_form(model: nn.Module) -> nn.Module:
    """`model` up to its raw head outputs when it is a detector of FAMILIES, else as it is."""
    return RawDetector(model) if isinstance(model, FAMILIES) else model


class RawDetector(nn.Module):
    """`detector` (an SSD, RetinaNet or FCOS) without its transform and post-processing.
    `sigmoid_classes`: its classes are scored one sigmoid each (RetinaNet, FCOS: focal loss,
    no background class) rather than by a softmax with a background class (SSD)."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.family = next(f for f in FAMILIES if isinstance(detector, f))
        self.backbone, self.head, self.anchor_generator = detector.backbone, detector.head, detector.anchor_generator
        # what the family's compute_loss and postprocess_detections read off their model: matcher,
        # box coder, thresholds, top-k
        for key, value in vars(detector).items():
            if not key.startswith("_") and key != "training":
                setattr(self, key, value)
        self.image_mean, self.image_std = tuple(detector.transform.image_mean), tuple(detector.transform.image_std)
        self.sigmoid_classes = self.family is not SSD
        self._anchors: dict[tuple, tuple[torch.Tensor, list[int]]] = {}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.head(list(self.backbone(images).values()))

    def anchors(self, images: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """The anchors (or FCOS's points, as boxes) for images of this size, in pixel
        coordinates, and how many of them each pyramid level holds; made once per size."""
        key = (tuple(images.shape[-2:]), images.device)
        if key not in self._anchors:
            was_training = self.backbone.training
            try:  # in eval mode: one image must not move the BatchNorm statistics (nor fail on a 1x1 level)
                with torch.no_grad():
                    one = images[:1]
                    features = list(self.backbone.eval()(one).values())
                    anchors = self.anchor_generator(ImageList(one, [tuple(one.shape[-2:])]), features)[0]
            finally:
                self.backbone.train(was_training)
            locations = [f.shape[-2] * f.shape[-1] for f in features]
            per_location = anchors.shape[0] // sum(locations)
            self._anchors[key] = anchors, [n * per_location for n in locations]
        return self._anchors[key]

    def loss(self, outputs: dict[str, torch.Tensor], targets: list[dict], images: torch.Tensor) -> torch.Tensor:
        """torchvision's loss of the family on raw outputs: SSD's matched default boxes with hard
        negative mining, RetinaNet's focal loss, FCOS's focal, GIoU and centerness losses."""
        anchors, levels = self.anchors(images)
        every = [anchors] * len(targets)
        if self.family is SSD:
            matched = [self.proposal_matcher(box_ops.box_iou(t["boxes"], anchors)) if t["boxes"].numel() else
                       torch.full((anchors.shape[0],), -1, dtype=torch.int64, device=anchors.device) for t in targets]
            losses = SSD.compute_loss(self, targets, outputs, every, matched)
        elif self.family is FCOS:
            losses = FCOS.compute_loss(self, targets, outputs, every, levels)
        else:
            losses = RetinaNet.compute_loss(self, targets, outputs, every)
        return sum(losses.values())

    def detections(self, outputs: dict[str, torch.Tensor], images: torch.Tensor) -> list[dict]:
        """Boxes, scores and labels per image: the anchors decoded, NMS per class."""
        anchors, levels = self.anchors(images)
        sizes = [tuple(images.shape[-2:])] * len(images)
        if self.family is SSD:
            return SSD.postprocess_detections(self, outputs, [anchors] * len(images), sizes)
        per_level = {k: list(v.split(levels, dim=1)) for k, v in outputs.items()}
        return self.family.postprocess_detections(self, per_level, [list(anchors.split(levels))] * len(images), sizes)


def fcos_mobilenet_v2(num_classes: int = 91, width_mult: float = 1.0) -> RawDetector:
    """FCOS (Tian et al. 2019) on torchvision's MobileNetV2 features, an edge detector whose
    backbone an ImageNet MobileNetV2 checkpoint fills: a 64-channel feature pyramid over the
    stride 8, 16 and 32 outputs plus a max-pooled stride-64 level, and two GroupNorm convs per
    head tower (torchvision's FCOS on ResNet-50 has 256 channels and four)."""
    features = tvm.mobilenet_v2(width_mult=width_mult).features
    taps = {"6": "0", "13": "1", "18": "2"}  # the last block of strides 8, 16, 32
    backbone = BackboneWithFPN(features, taps, [features[int(i)].out_channels for i in taps], 64)
    points = AnchorGenerator(((8,), (16,), (32,), (64,)), ((1.0,),) * 4)  # one point per location, sized as its stride
    return RawDetector(FCOS(backbone, num_classes, anchor_generator=points, head=FCOSHead(64, 1, num_classes, 2)))
