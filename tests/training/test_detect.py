"""Anchor-free and FPN detectors (FCOS, RetinaNet) as raw head outputs: the same losses and
detections as torchvision's own model, and an FCOS through prune -> recover -> mAP -> ONNX and
TFLite, float and int8 (gated by the mAP of the file's detections against the float model's)."""
import pytest
import torch
from torchvision.models import mobilenet_v3_small
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN

import compress
from compress.data.specs import eval_set, loader
from compress.models.detection import RawDetector
from compress.training.evaluate import evaluate

FACTORY = '''from torchvision.models import mobilenet_v3_small
from torchvision.models.detection import FCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.fcos import FCOSHead


def fcos_small(num_classes=4):
    """FCOS on a MobileNetV3-Small FPN (strides 8-64): a 64-channel pyramid, two GroupNorm convs per tower."""
    backbone = BackboneWithFPN(mobilenet_v3_small().features, {"3": "0", "8": "1", "12": "2"}, [24, 48, 576], 64)
    return FCOS(backbone, num_classes, anchor_generator=AnchorGenerator(((8,), (16,), (32,), (64,)), ((1.0,),) * 4),
                head=FCOSHead(64, 1, num_classes, num_convs=2))
'''


def small_backbone() -> BackboneWithFPN:
    return BackboneWithFPN(mobilenet_v3_small().features, {"3": "0", "8": "1", "12": "2"}, [24, 48, 576], 32)


def detectors(size: int) -> list:
    """torchvision's FCOS and RetinaNet on a small backbone, their transform resizing nothing
    (images already `size`) and every score kept, so detections can be compared."""
    fcos = FCOS(small_backbone(), 3, min_size=size, max_size=size, score_thresh=0.0,
                anchor_generator=AnchorGenerator(((8,), (16,), (32,), (64,)), ((1.0,),) * 4))
    retina = RetinaNet(small_backbone(), 3, min_size=size, max_size=size, score_thresh=0.0,
                       anchor_generator=AnchorGenerator(((16,), (32,), (64,), (128,)), ((0.5, 1.0, 2.0),) * 4))
    return [fcos, retina]


@pytest.mark.parametrize("index", [0, 1], ids=["fcos", "retinanet"])
def test_the_raw_form_has_torchvisions_own_losses_and_detections(index):
    torch.manual_seed(0)
    size = 96
    detector = detectors(size)[index]
    raw = RawDetector(detector)
    images = torch.rand(2, 3, size, size)
    mean, std = torch.tensor(raw.image_mean).view(3, 1, 1), torch.tensor(raw.image_std).view(3, 1, 1)
    normalized = (images - mean) / std  # what the raw network takes: the card's mean/std applied outside
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [40.0, 5.0, 90.0, 30.0]]),
                "labels": torch.tensor([1, 2])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    detector.train()
    theirs = sum(detector(list(images), targets).values())
    ours = raw.loss(raw.train()(normalized), targets, normalized)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        expected = detector.eval()(list(images))
        found = raw.detections(raw.eval()(normalized), normalized)
    assert len(found[0]["boxes"]) > 10  # every score kept: the comparison has boxes to compare
    for got, want in zip(found, expected):
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_an_fcos_prunes_recovers_scores_map_and_exports_float_and_int8_tflite(tmp_path):
    from compress import stages
    from compress.settings import DataSettings, ExportSettings, PruneSettings, TrainSettings
    from compress.training.loop import fit
    torch.manual_seed(0)
    (tmp_path / "nets.py").write_text(FACTORY)
    model = compress.build(f"{tmp_path / 'nets.py'}:fcos_small", num_classes=4, input_size=96)
    assert isinstance(model, RawDetector) and model.card.task == "detect"
    data = DataSettings(spec="shapeboxes:64", batch_size=8, workers=0)
    quick = TrainSettings(epochs=1, steps_per_epoch=20, lr=0.01, holdout=8, keep_best=False, eval_every=0,
                          val_images=8, channels_last=False)
    trained = fit(model, data, quick, tmp_path / "train", quiet=True)
    pruned = stages.prune(trained, PruneSettings(reconstruct_images=16), macs="50%", data=data.spec).model
    assert 0.47 <= compress.count(pruned, 96)[0] / compress.count(trained, 96)[0] <= 0.50
    recovered = fit(pruned, data, quick.model_copy(update={"kd_weight": 0.7, "steps_per_epoch": 5}),
                    tmp_path / "finetune", teacher=trained, quiet=True)
    result = evaluate(recovered, loader(eval_set("shapeboxes:64", 96, model.card.mean, model.card.std, 4), 8),
                      teacher=trained)
    assert {"map", "map_50", "loss", "fidelity_map"} <= set(result) and 0 <= result["map"] <= 1
    # TFLite alone: the SSDlite test exports a raw head to ONNX (tests/data/test_dense.py), and each file costs seconds
    report = stages.export(recovered, "tflite", tmp_path / "fcos.tflite", data=data.spec)
    assert report["outputs"] == ["cls_logits", "bbox_regression", "bbox_ctrness"]
    assert all(r["max_abs_diff"] <= 1e-3 * max(1.0, r["max_abs_logit"]) for r in report["parity"]["outputs"].values())
    float_gate = report["parity"]
    assert float_gate["agreement_of"] == "mAP@50" and float_gate["top1_agreement"] > 0.95  # float: the same boxes
    # int8: ONNX Runtime's int8 gate runs on the segmenter (test_task_export)
    int8 = stages.export(recovered, "tflite", tmp_path / "fcos_int8.tflite",
                         ExportSettings(int8=True, calib_images=32, min_agreement=0.3), data=data.spec)
    p = int8["parity"]
    assert p["agreement_of"] == "mAP@50" and p["reference_boxes"] > 0 and 0.3 <= p["top1_agreement"] <= 1, p
    assert p["map_agreement"] <= p["top1_agreement"]  # mAP@[.5:.95] also counts the boxes' last pixels
