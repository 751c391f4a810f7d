"""What a model predicts, as one small object per task that the training loop, the evaluator
and the distiller ask: how to read the model's outputs, the task loss, the distillation loss
from a teacher's outputs, and the metric (with the key keep-best and the reports rank by).

- `classify`: logits (N, classes); cross-entropy, KL on softened logits, top-1/top-5;
- `segment`: per-pixel logits (N, classes, H, W), a tensor or torchvision's {"out", "aux"};
  cross-entropy ignoring label 255 (VOC's borders), per-pixel KL, mIoU from a confusion matrix
  (torchmetrics), and against a teacher its fidelity: the mIoU of the model's pixels taking the
  teacher's predictions as the truth, which needs no labels;
- `detect`: a detector's raw head outputs (compress.models.detection.RawDetector: class logits
  and box regressions per anchor or point); its own loss (torchvision's: SSD's matching and hard
  negatives, RetinaNet's and FCOS's focal losses), distillation of the class scores (KL per box:
  over a softmax with a background class, or per class over sigmoids) and of the boxes the
  teacher believes in, COCO mAP (torchmetrics on pycocotools) of the decoded, NMS-ed
  detections, and fidelity: mAP against the teacher's detections scoring at least 0.5;
- `embed`: an embedding (N, D) compared by cosine similarity (face recognition, re-identification),
  its labels the identities; batch-hard triplet loss, distillation of the teacher's embedding
  direction (1 - cosine), retrieval recall@1 and mAP over the evaluation images, and fidelity:
  the mean cosine similarity to the teacher's embeddings and how often the nearest neighbour is
  the teacher's;
- `restore`: an output image (super-resolution: N, 3, rH, rW) against the high-resolution
  target in [0, 1]; L1 loss, L1 distillation of the teacher's image, PSNR and SSIM, and
  fidelity: the PSNR of the output against the teacher's.

Every loss takes the images too (a detector's default boxes depend on their size).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from compress.models.card import card_of
from compress.data.dense import IGNORE
from compress.errors import CompressError
from compress.training import restoration, retrieval



def softened_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) over dim 1 of softened logits, scaled by T^2 (Hinton et al.);
    averaged over the other positions (images, and pixels of a dense output)."""
    t = temperature
    kl = nn.functional.kl_div(nn.functional.log_softmax(student / t, 1), nn.functional.log_softmax(teacher / t, 1),
                              reduction="none", log_target=True).sum(1)
    return kl.mean() * t * t


def sigmoid_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """The KL between the teacher's and the student's softened Bernoulli per class (the last
    dim), summed over the classes, averaged over the other positions, scaled by T^2."""
    s, t = student / temperature, teacher / temperature
    p = t.sigmoid()
    kl = (p * (nn.functional.logsigmoid(t) - nn.functional.logsigmoid(s))
          + (1 - p) * (nn.functional.logsigmoid(-t) - nn.functional.logsigmoid(-s)))
    return kl.sum(-1).mean() * temperature * temperature


class Classify:
    name, score, label = "classify", "top1", "top-1"

    def __init__(self, label_smoothing: float = 0.0):
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def logits(self, outputs) -> torch.Tensor:
        return outputs

    def loss(self, outputs, targets: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        return self.criterion(outputs, targets)

    def distill(self, outputs, teacher_outputs, temperature: float) -> torch.Tensor:
        return softened_kl(outputs, teacher_outputs, temperature)

    def meter(self, logits, device) -> "_TopK":
        return _TopK(device)


class Segment(Classify):
    name, score, label = "segment", "miou", "mIoU"

    def __init__(self, label_smoothing: float = 0.0, aux_weight: float = 0.5):
        self.criterion = nn.CrossEntropyLoss(ignore_index=IGNORE, label_smoothing=label_smoothing)
        self.aux_weight = aux_weight

    def logits(self, outputs) -> torch.Tensor:
        return outputs["out"] if isinstance(outputs, dict) else outputs

    def loss(self, outputs, targets: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        loss = self.criterion(self.logits(outputs), targets)
        if isinstance(outputs, dict) and "aux" in outputs:  # torchvision's auxiliary head, as its reference trains it
            loss = loss + self.aux_weight * self.criterion(outputs["aux"], targets)
        return loss

    def distill(self, outputs, teacher_outputs, temperature: float) -> torch.Tensor:
        return softened_kl(self.logits(outputs), self.logits(teacher_outputs), temperature)

    def meter(self, logits, device) -> "_IoU":
        return _IoU(logits.shape[1], device)


class Detect(Classify):
    name, score, label = "detect", "map", "mAP"

    def __init__(self, model: nn.Module):
        self.model = model  # its default boxes, matcher and post-processing (they do not train)

    def loss(self, outputs, targets: list[dict], images: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.loss(outputs, targets, images)

    def distill(self, outputs, teacher_outputs, temperature: float) -> torch.Tensor:
        student, teacher = outputs["cls_logits"], teacher_outputs["cls_logits"]
        if getattr(self.model, "sigmoid_classes", False):  # focal-loss heads: one binary KL per class
            kl = sigmoid_kl(student, teacher, temperature)
            objectness = teacher.sigmoid().amax(-1)
        else:
            kl = softened_kl(student.transpose(1, 2), teacher.transpose(1, 2), temperature)
            objectness = 1 - teacher.softmax(-1)[..., 0]
        # the boxes (and FCOS's centerness) where the teacher sees an object, weighted by how sure it is
        boxes = sum(nn.functional.smooth_l1_loss(outputs[key], teacher_outputs[key], reduction="none").sum(-1)
                    for key in outputs if key != "cls_logits")
        return kl + (boxes * objectness).sum() / objectness.sum().clamp(min=1.0)

    def meter(self, logits, device) -> "_MAP":
        return _MAP(self.model, device)


class Embed(Classify):
    name, score, label = "embed", "recall1", "recall@1"

    def __init__(self, margin: float = 0.3):
        self.margin = margin

    def loss(self, outputs, targets: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        """Batch-hard triplet loss (Hermans et al. 2017) on normalised embeddings: each image's
        farthest same-identity image against its nearest other one; 0 for a batch without a pair."""
        emb = retrieval.normalized(outputs)
        dist_ = torch.cdist(emb, emb)
        same = targets[:, None].eq(targets[None, :])
        anchors = (same.sum(1) > 1) & (~same).any(1)
        if not anchors.any():
            return outputs.sum() * 0.0
        hardest_positive = (dist_ * same).max(1).values
        hardest_negative = dist_.masked_fill(same, float("inf")).min(1).values
        return nn.functional.relu(hardest_positive - hardest_negative + self.margin)[anchors].mean()

    def distill(self, outputs, teacher_outputs, temperature: float) -> torch.Tensor:
        return (1 - nn.functional.cosine_similarity(outputs.float(), teacher_outputs.float(), dim=1)).mean()

    def meter(self, logits, device) -> retrieval.RetrievalMeter:
        return retrieval.RetrievalMeter(self, device)


class Restore(Classify):
    name, score, label = "restore", "psnr", "PSNR"

    def logits(self, outputs) -> torch.Tensor:
        return outputs["out"] if isinstance(outputs, dict) else outputs

    def loss(self, outputs, targets: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        return nn.functional.l1_loss(self.logits(outputs), targets)

    def distill(self, outputs, teacher_outputs, temperature: float) -> torch.Tensor:
        return nn.functional.l1_loss(self.logits(outputs), self.logits(teacher_outputs))

    def meter(self, logits, device) -> restoration.RestoreMeter:
        return restoration.RestoreMeter(device)


class UserLoss:
    """A task with the user's own loss, `loss(outputs, targets)`, in place of its own; the
    distillation and the metric stay the task's."""

    def __init__(self, task: Classify, loss):
        self.task, self.user_loss = task, loss
        self.name, self.score, self.label = task.name, task.score, task.label

    def loss(self, outputs, targets, images: torch.Tensor | None = None) -> torch.Tensor:
        return self.user_loss(outputs, targets)

    def __getattr__(self, name: str):  # logits, distill, meter: the task's
        return getattr(self.task, name)


def task_of(model: nn.Module, label_smoothing: float = 0.0) -> Classify:
    """The task object of a model carrying a card."""
    name = card_of(model).task
    if name == "classify":
        return Classify(label_smoothing)
    if name == "segment":
        return Segment(label_smoothing)
    if name == "embed":
        return Embed()
    if name == "restore":
        return Restore()
    if callable(getattr(model, "loss", None)) and callable(getattr(model, "detections", None)):
        return Detect(model)
    raise CompressError(f"{type(model).__name__} is a detector compress prunes but cannot train or evaluate: that "
                        "takes a detector up to its raw head outputs (torchvision's SSD, SSDlite, RetinaNet and FCOS "
                        "are built that way, or give your model loss(outputs, targets, images) and "
                        "detections(outputs, images) methods). "
                        "Its post-processing (NMS) does not export either; export the network before it.")


class _TopK:
    """Loss, top-1 and top-5 of classification logits (summed across torchrun ranks); with a
    teacher, the share of images whose top-1 is the teacher's (fidelity). `correct`: this
    rank's per-image top-1 hits in loader order, for a paired comparison of two states, and
    `losses` their cross-entropy; `divergence`, with a teacher, each image's KL(teacher || model)
    at temperature 1."""

    def __init__(self, device):
        self.sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss, top1, top5, count, same as teacher
        self.teacher = False
        self.correct: list[torch.Tensor] = []
        self.losses: list[torch.Tensor] = []
        self.divergence: list[torch.Tensor] = []

    def update(self, logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None = None,
               images: torch.Tensor | None = None) -> None:
        logits = logits.float()
        hit = logits.topk(min(5, logits.shape[1]), dim=1).indices.eq(labels[:, None])
        self.correct.append(hit[:, 0])
        losses = nn.functional.cross_entropy(logits, labels, reduction="none")
        self.losses.append(losses)
        same = torch.zeros((), device=logits.device)
        if teacher_logits is not None:
            self.teacher = True
            same = logits.argmax(1).eq(teacher_logits.argmax(1)).sum()
            target = nn.functional.log_softmax(teacher_logits.float(), 1)
            self.divergence.append((target.exp() * (target - nn.functional.log_softmax(logits, 1))).sum(1))
        self.sums += torch.stack([losses.sum().double(),
                                  hit[:, :1].sum().double(), hit.sum().double(),
                                  torch.tensor(float(len(labels)), dtype=torch.float64, device=self.sums.device),
                                  same.double()])

    def result(self, distributed_sum: bool) -> dict:
        if distributed_sum and dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.sums)
        loss, top1, top5, n, same = self.sums.tolist()
        n = max(n, 1.0)
        return {"top1": top1 / n, "top5": top5 / n, "loss": loss / n, "images": int(n),
                **({"fidelity_top1": same / n} if self.teacher else {})}


class _Paired:
    """A metric against the truth and the same against a teacher's predictions (fidelity), with
    the mean loss beside them; sums across torchrun ranks when asked."""

    def __init__(self, truth, fidelity, device):
        self.truth, self.fidelity = truth.to(device), fidelity.to(device)
        self.sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss, images
        self.teacher = False

    def _add_loss(self, loss: torch.Tensor, images: int) -> None:
        self.sums += torch.stack([loss.double() * images, torch.tensor(float(images), dtype=torch.float64,
                                                                        device=self.sums.device)])

    def _totals(self, distributed_sum: bool) -> dict:
        for metric in (self.truth, self.fidelity):
            metric.sync_on_compute = distributed_sum
        if distributed_sum and dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.sums)
        loss, n = self.sums.tolist()
        return {"loss": loss / max(n, 1.0), "images": int(n)}


class _IoU(_Paired):
    """mIoU and pixel accuracy from a confusion matrix (torchmetrics), the mean taken over
    the classes that occur in the truth or the predictions; with a teacher, the same against
    the teacher's predictions (fidelity)."""

    def __init__(self, num_classes: int, device):
        from torchmetrics.classification import MulticlassConfusionMatrix
        super().__init__(MulticlassConfusionMatrix(num_classes, ignore_index=IGNORE),
                         MulticlassConfusionMatrix(num_classes), device)

    def update(self, logits: torch.Tensor, masks: torch.Tensor, teacher_logits: torch.Tensor | None = None,
               images: torch.Tensor | None = None) -> None:
        logits = logits.float()
        preds = logits.argmax(1)
        self.truth.update(preds, masks)
        self._add_loss(nn.functional.cross_entropy(logits, masks, ignore_index=IGNORE), len(masks))
        if teacher_logits is not None:
            self.teacher = True
            self.fidelity.update(preds, teacher_logits.argmax(1))

    def result(self, distributed_sum: bool) -> dict:
        out = {**self._totals(distributed_sum), **miou(self.truth.compute())}
        if self.teacher:
            fidelity = miou(self.fidelity.compute())
            out.update(fidelity_miou=fidelity["miou"], fidelity_pixel_acc=fidelity["pixel_acc"])
        return out


SURE_SCORE = 0.5  # a reference detector's detections taken as the truth score at least this


def mean_average_precision():
    """torchmetrics' COCO mAP of boxes (x1, y1, x2, y2), scoring each image's top 100 as COCO
    intends without warning that there are more."""
    from torchmetrics.detection import MeanAveragePrecision
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox")
    metric.warn_on_many_detections = False
    return metric


def sure(detections: list[dict], score: float = SURE_SCORE) -> list[dict]:
    """Each image's detections scoring at least `score`, as the truth another detector's are
    measured against (fidelity, the int8 gate)."""
    return [{"boxes": d["boxes"][d["scores"] >= score], "labels": d["labels"][d["scores"] >= score]}
            for d in detections]


class _MAP(_Paired):
    """COCO mAP of the decoded detections (torchmetrics' MeanAveragePrecision); with a teacher,
    the same against its detections scoring at least SURE_SCORE (fidelity)."""

    def __init__(self, model: nn.Module, device):
        super().__init__(mean_average_precision(), mean_average_precision(), device)
        self.model = model

    def update(self, outputs: dict, targets: list[dict], teacher_outputs: dict | None = None,
               images: torch.Tensor | None = None) -> None:
        outputs = {k: v.float() for k, v in outputs.items()}
        found = self.model.detections(outputs, images)
        self.truth.update(found, targets)
        self._add_loss(self.model.loss(outputs, targets, images), len(targets))
        if teacher_outputs is not None:
            self.teacher = True
            self.fidelity.update(found, sure(self.model.detections({k: v.float() for k, v in teacher_outputs.items()},
                                                                   images)))

    def result(self, distributed_sum: bool) -> dict:
        out = self._totals(distributed_sum)
        found = self.truth.compute()  # -1 where there is no box to find
        out.update(map=max(float(found["map"]), 0.0), map_50=max(float(found["map_50"]), 0.0))
        if self.teacher:
            fidelity = float(self.fidelity.compute()["map"])
            out["fidelity_map"] = fidelity if fidelity >= 0 else None  # the teacher was sure of nothing
        return out


def miou(confusion: torch.Tensor) -> dict:
    """mIoU over the classes in the truth (rows) or the predictions (columns) of a confusion
    matrix, and the pixel accuracy."""
    confusion = confusion.double()
    hits = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - hits
    present = union > 0
    iou = hits[present] / union[present]
    return {"miou": float(iou.mean()) if present.any() else 0.0,
            "pixel_acc": float(hits.sum() / confusion.sum().clamp(min=1))}
