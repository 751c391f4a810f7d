"""A torchvision SSD / SSDlite up to its raw head outputs: the network compress prunes, trains,
evaluates and exports for detection.

torchvision's detectors resize and normalise inside `forward` and end in data-dependent
post-processing (box decoding, per-class top-k, NMS) that an exported file cannot hold as
plain tensor ops. `RawSSD` takes images already resized to its input size and normalised
with its card's mean/std, and returns the head's outputs: `cls_logits` (N, anchors, classes)
and `bbox_regression` (N, anchors, 4). The exported ONNX and TFLite files compute exactly
those; decoding against the anchors and NMS (`detections`) run outside the file, the way
torchvision's own post-processing does them.
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models.detection.ssd import SSD
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import boxes as box_ops


class RawSSD(nn.Module):
    def __init__(self, ssd: SSD):
        super().__init__()
        self.backbone, self.head = ssd.backbone, ssd.head
        # what SSD.compute_loss and SSD.postprocess_detections read off their model
        self.anchor_generator, self.box_coder, self.proposal_matcher = (ssd.anchor_generator, ssd.box_coder,
                                                                        ssd.proposal_matcher)
        self.neg_to_pos_ratio, self.score_thresh, self.nms_thresh = (ssd.neg_to_pos_ratio, ssd.score_thresh,
                                                                     ssd.nms_thresh)
        self.detections_per_img, self.topk_candidates = ssd.detections_per_img, ssd.topk_candidates
        self.image_mean, self.image_std = tuple(ssd.transform.image_mean), tuple(ssd.transform.image_std)
        self._anchors: dict[tuple, torch.Tensor] = {}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.head(list(self.backbone(images).values()))

    def anchors(self, images: torch.Tensor) -> torch.Tensor:
        """The default boxes for images of this size (pixel coordinates), made once per size."""
        key = (tuple(images.shape[-2:]), images.device)
        if key not in self._anchors:
            with torch.no_grad():
                one = images[:1]
                features = list(self.backbone(one).values())
                self._anchors[key] = self.anchor_generator(ImageList(one, [tuple(one.shape[-2:])]), features)[0]
        return self._anchors[key]

    def loss(self, outputs: dict[str, torch.Tensor], targets: list[dict], images: torch.Tensor) -> torch.Tensor:
        """torchvision's SSD loss (matched default boxes, smooth L1 on boxes, cross-entropy with
        hard negative mining) on raw outputs."""
        anchors = self.anchors(images)
        matched = [self.proposal_matcher(box_ops.box_iou(t["boxes"], anchors)) if t["boxes"].numel() else
                   torch.full((anchors.shape[0],), -1, dtype=torch.int64, device=anchors.device) for t in targets]
        losses = SSD.compute_loss(self, targets, outputs, [anchors] * len(targets), matched)
        return losses["bbox_regression"] + losses["classification"]

    def detections(self, outputs: dict[str, torch.Tensor], images: torch.Tensor) -> list[dict]:
        """Boxes, scores and labels per image: the anchors decoded, NMS per class."""
        size = tuple(images.shape[-2:])
        return SSD.postprocess_detections(self, outputs, [self.anchors(images)] * len(images), [size] * len(images))
