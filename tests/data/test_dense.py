"""Segmentation through the pipeline: its data (VOC-style folders, generated shapes), its task
(per-pixel loss and distillation, mIoU and fidelity), and a recipe on a torchvision segmenter
that prunes, recovers, evaluates, exports and times it."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import models as tvm

import compress
from compress import CompressError
from compress.data.specs import build_dataset, check_task, eval_set, loader, split
from compress.data.dense import shapes
from compress.training.evaluate import evaluate
from compress.training.tasks import IGNORE, Segment, softened_kl
from conftest import run_cli


def test_generated_shapes_masks_and_boxes_agree():
    images, masks, boxes = shapes(12, 48, seed=3)
    assert images.shape == (12, 48, 48, 3) and masks.shape == (12, 48, 48) and images.dtype == np.uint8
    again = shapes(12, 48, seed=3)
    assert (again[0] == images).all() and (again[1] == masks).all()
    for mask, rows in zip(masks, boxes):
        assert set(np.unique(mask)) - {0} == {int(c) for c in rows[:, 4]}
        for x1, y1, x2, y2, cls in rows.astype(int):  # each box is the extent of its class's pixels
            ys, xs = np.nonzero(mask == cls)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x1, y1, x2, y2)


def _voc(root, labels):
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, label in enumerate(labels):
        Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"im{i}.jpg")
        mask = np.zeros((40, 60), np.uint8)
        mask[10:30, 20:50] = label
        mask[8:11, :] = IGNORE  # a VOC border
        png = Image.fromarray(mask, mode="P")
        png.putpalette([0, 0, 0, 128, 0, 0] * 128)
        png.save(root / "SegmentationClass" / f"im{i}.png")
    (root / "ImageSets/Segmentation/train.txt").write_text("".join(f"im{i}\n" for i in range(len(labels) - 1)))
    (root / "ImageSets/Segmentation/val.txt").write_text(f"im{len(labels) - 1}\n")


def test_voc_folder_reads_images_and_masks_resized_jointly(tmp_path):
    _voc(tmp_path, [1, 2, 3])
    train = split(f"voc:{tmp_path}", True, 32, (0.5,) * 3, (0.25,) * 3, num_classes=4)
    assert len(train) == 2 and len(build_dataset(f"voc:{tmp_path}", False)) == 1
    image, mask = split(f"voc:{tmp_path}", False, 32, (0.5,) * 3, (0.25,) * 3, num_classes=4)[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert mask.shape == (32, 32) and mask.dtype == torch.int64
    assert set(mask.unique().tolist()) == {0, 3, IGNORE}  # nearest neighbour: no blended labels
    with pytest.raises(CompressError, match="pixel label 3 but the model has 3 classes"):
        eval_set(f"voc:{tmp_path}", 32, (0.5,) * 3, (0.25,) * 3, 3)
    with pytest.raises(CompressError, match="ImageSets"):
        build_dataset(f"voc:{tmp_path / 'JPEGImages'}", True)


def test_segment_task_losses_and_miou():
    task = Segment()
    logits = torch.randn(2, 3, 4, 4)
    masks = logits.argmax(1)
    masks[0, 0, 0] = IGNORE
    assert task.loss({"out": logits}, masks) < task.loss({"out": -logits}, masks)
    assert softened_kl(logits, logits, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    meter = task.meter(torch.zeros(1, 3), "cpu")
    preds = torch.tensor([[[0, 0], [1, 2]]])
    truth = torch.tensor([[[0, 1], [1, IGNORE]]])
    meter.update(torch.nn.functional.one_hot(preds, 3).permute(0, 3, 1, 2).float() * 5, truth)
    result = meter.result(distributed_sum=False)
    # class 0: 1 hit / union 2; class 1: 1 / 2; class 2 is predicted only where the truth is ignored
    assert result["miou"] == pytest.approx(0.5) and result["pixel_acc"] == pytest.approx(2 / 3)


def test_a_segmenter_evaluates_mIoU_and_its_fidelity_and_refuses_class_labels():
    torch.manual_seed(0)
    model = compress.build("torchvision:lraspp_mobilenet_v3_large", num_classes=4, input_size=32).eval()
    assert model.card.task == "segment"
    ds = eval_set("shapes:32", 32, model.card.mean, model.card.std, 4)
    result = evaluate(model, loader(ds, 8), teacher=model)
    assert 0 <= result["miou"] <= 1 and result["fidelity_miou"] == 1.0 and result["images"] == 8
    with pytest.raises(CompressError, match="holds class labels, but the model is a segment model"):
        check_task("synthetic:8", "segment")


def test_an_imagenet_classifier_gives_a_segmenter_its_backbone(tmp_path):
    torch.manual_seed(0)
    net = tvm.mobilenet_v2()
    torch.save(net.state_dict(), tmp_path / "mnv2.pth")
    model = compress.build("lraspp_mobilenet_v2", num_classes=4, pretrained=str(tmp_path / "mnv2.pth"))
    torch.testing.assert_close(model.features.state_dict(), net.features.state_dict())


RECIPE = """\
name: seg
out: {out}
model:
  name: torchvision:lraspp_mobilenet_v3_large
  num_classes: 4
  input_size: 48
data:
  spec: shapes:48
  batch_size: 8
  workers: 0
transfer:
  epochs: 1
  steps_per_epoch: 3
  lr: 0.01
  val_images: 8
supernet:
  method: none
prune:
  reconstruct_images: 16
  targets:
    - macs: 50%
finetune:
  epochs: 1
  steps_per_epoch: 2
  block_steps: 5
  holdout: 8
  val_images: 8
export:
  formats: [onnx]          # TFLite's multi-output files: tests/export/test_export.py
  parity_images: 2
latency:
  runs: 3
  warmup: 1
"""


@pytest.mark.slow
def test_a_torchvision_segmenter_recipe_prunes_recovers_evaluates_exports_and_times(tmp_path):
    recipe = tmp_path / "seg.yaml"
    recipe.write_text(RECIPE.format(out=tmp_path / "runs"))
    done = run_cli("run", recipe)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = (tmp_path / "runs" / "seg" / "report.md").read_text()
    assert "test mIoU before fine-tune" in report and "fidelity to unpruned" in report
    tuned = json.loads((tmp_path / "runs" / "seg" / "finetune" / "stage.json").read_text())["outputs"]["nets"]["macs50pct"]
    assert {"miou", "pixel_acc", "fidelity_miou"} <= set(tuned["test_after"])
    pruned = compress.load(tuned["path"])
    full = compress.build("torchvision:lraspp_mobilenet_v3_large", num_classes=4, input_size=48)
    assert 0.47 <= compress.count(pruned, 48)[0] / compress.count(full, 48)[0] <= 0.50
    assert (tmp_path / "runs" / "seg" / "export" / "macs50pct.onnx").is_file() and "macs50pct.onnx" in report
    assert "unpruned.onnx" in report


@pytest.mark.slow
def test_an_ssdlite_detector_prunes_recovers_evaluates_and_exports_its_raw_head(tmp_path):
    """SSDlite (MobileNetV3 backbone) through prune -> recover (its own loss, distilled from the
    unpruned net) -> mAP and fidelity -> ONNX with parity on both head outputs."""
    from compress import stages
    from compress.settings import DataSettings, PruneSettings, TrainSettings
    from compress.training.loop import fit
    torch.manual_seed(0)
    model = compress.build("torchvision:ssdlite320_mobilenet_v3_large", num_classes=4, input_size=96)
    assert model.card.task == "detect" and model.card.mean == (0.5, 0.5, 0.5)
    data = DataSettings(spec="shapeboxes:32", batch_size=8, workers=0)
    quick = TrainSettings(epochs=1, steps_per_epoch=3, lr=0.01, holdout=8, keep_best=True, eval_every=0,
                          val_images=8, channels_last=False)
    trained = fit(model, data, quick, tmp_path / "train", quiet=True)
    pruned = stages.prune(trained, PruneSettings(reconstruct_images=16), macs="50%", data=data.spec).model
    assert 0.47 <= compress.count(pruned, 96)[0] / compress.count(trained, 96)[0] <= 0.50
    recovered = fit(pruned, data, quick.model_copy(update={"kd_weight": 0.7}), tmp_path / "finetune",
                    teacher=trained, quiet=True)
    ds = eval_set("shapeboxes:32", 96, model.card.mean, model.card.std, 4)
    result = evaluate(recovered, loader(ds, 4), teacher=trained)
    assert {"map", "map_50", "loss", "fidelity_map"} <= set(result) and 0 <= result["map"] <= 1
    # TFLite writes several outputs the same way (tests/export/test_export.py); its SSDlite row: bench_coverage.py
    report = stages.export(recovered, "onnx", tmp_path / "det.onnx", data=data.spec)
    assert report["outputs"] == ["bbox_regression", "cls_logits"]
    assert all(r["max_abs_diff"] <= 1e-3 * max(1.0, r["max_abs_logit"]) for r in report["parity"]["outputs"].values())


def test_coco_format_folder_reads_boxes_and_category_ids(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "val").mkdir()
    Image.fromarray(np.zeros((50, 80, 3), np.uint8)).save(tmp_path / "val" / "a.jpg")
    coco = {"images": [{"id": 7, "file_name": "a.jpg", "width": 80, "height": 50}],
            "annotations": [{"id": 1, "image_id": 7, "category_id": 3, "bbox": [10, 5, 20, 30], "area": 600,
                             "iscrowd": 0},
                            {"id": 2, "image_id": 7, "category_id": 1, "bbox": [0, 0, 80, 50], "area": 4000,
                             "iscrowd": 1}],  # a crowd region is no box to find
            "categories": [{"id": 1, "name": "a"}, {"id": 3, "name": "c"}]}
    (tmp_path / "annotations" / "instances_val.json").write_text(json.dumps(coco))
    image, target = split(f"coco:{tmp_path}", False, 40, (0.5,) * 3, (0.5,) * 3)[0]
    assert image.shape == (3, 40, 40) and target["labels"].tolist() == [3]
    torch.testing.assert_close(target["boxes"], torch.tensor([[5.0, 4.0, 15.0, 28.0]]))  # x by 40/80, y by 40/50
    with pytest.raises(CompressError, match="box label 3; labels run from 1 to 2"):
        eval_set(f"coco:{tmp_path}", 40, (0.5,) * 3, (0.5,) * 3, 3)
    with pytest.raises(CompressError, match="instances_train.json"):
        build_dataset(f"coco:{tmp_path}", True)
