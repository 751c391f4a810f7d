"""Exporting what is not a classifier: a refused detector export's few lines, and a
segmenter's int8 file gated by the mIoU of its pixels against the float model's."""
import numpy as np
import pytest
import torch

import compress
from conftest import run_cli


@pytest.mark.slow
def test_a_refused_detector_export_says_why_in_a_few_lines(tmp_path):
    """torch.export prints a detector's whole traced graph (thousands of lines) before it fails
    on the post-processing; the user sees the one error, in a handful of lines, and exit 2."""
    out = run_cli("export", "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn", "--input-size", "64",
                  "--format", "onnx",
                  "-o", tmp_path / "frcnn.onnx", fresh=True)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.startswith("chansearch export: error: ONNX export failed: TorchExportError")
    assert len(out.stderr.splitlines()) <= 20 and not out.stdout


@pytest.mark.slow
def test_a_segmenters_int8_file_is_gated_by_miou_against_the_float_model(tmp_path):
    """LRASPP's int8 files (TFLite and ONNX), checked by the mIoU of their per-pixel
    predictions taking the float model's as the truth, with the pixel agreement beside it."""
    from compress import stages
    from compress.settings import DataSettings, ExportSettings, TrainSettings
    from compress.training.loop import fit
    torch.manual_seed(0)
    model = compress.build("lraspp_mobilenet_v2", num_classes=4, input_size=64)
    quick = TrainSettings(epochs=2, lr=0.05, val_images=0, channels_last=False)
    trained = fit(model, DataSettings(spec="shapes:256", batch_size=16, workers=0), quick, tmp_path / "t", quiet=True,
                  validate=False)
    from compress.data.specs import sample_labelled
    images, _ = sample_labelled("shapes:64", False, 32, 64, model.card.mean, model.card.std, seed=1)
    with torch.no_grad():
        assert len(trained(images)["out"].argmax(1).unique()) >= 3  # shapes found, not one class everywhere
    for fmt in ("tflite", "onnx"):
        report = stages.export(trained, fmt, tmp_path / f"seg_int8.{fmt}", ExportSettings(int8=True, min_agreement=0.5,
                                                                                          calib_images=32, parity_images=32),
                               data="shapes:64")
        p = report["parity"]
        assert p["agreement_of"] == "mIoU" and 0.5 <= p["top1_agreement"] <= 1 and 0.5 <= p["pixel_agreement"] <= 1, p


def test_a_segmenters_agreement_is_the_miou_of_its_pixels_against_the_float_ones():
    from compress.export.parity import compare
    reference = np.zeros((1, 3, 2, 2), np.float32)
    reference[0, :, 0, 0], reference[0, :, 0, 1], reference[0, :, 1, :] = [1, 0, 0], [0, 1, 0], [[0, 0], [0, 0], [1, 1]]
    exported = reference.copy()
    exported[0, :, 0, 1] = [0, 0, 1]  # the class-1 pixel read as class 2
    p = compare("seg", reference, exported, None, task="segment")
    # class 0: 1/1, class 1: 0/1, class 2: 2/3 -> mIoU 5/9; 3 of 4 pixels agree
    assert p["agreement_of"] == "mIoU" and p["top1_agreement"] == pytest.approx(5 / 9) and p["pixel_agreement"] == 0.75


def test_a_segmenter_with_an_aux_head_is_gated_on_its_out_output():
    """deeplabv3/FCN with aux_loss return {"out", "aux"}: both are compared with PyTorch, the
    int8 gate reads the mIoU of "out" alone."""
    from compress.export.parity import compare_outputs
    out = np.zeros((1, 2, 2, 2), np.float32)
    out[0, 1, 0, :] = 1  # top row class 1, bottom row class 0
    aux = np.random.default_rng(0).normal(size=(1, 2, 2, 2)).astype(np.float32)
    exported_out = out.copy()
    exported_out[0, 1, 0, 1] = -1  # one class-1 pixel read as class 0
    p = compare_outputs("seg", [out, aux], [exported_out, aux + 0.5], ["out", "aux"], None, task="segment")
    # class 0: 2 hits of 3 -> 2/3, class 1: 1/2 -> mIoU 7/12; 3 of 4 pixels agree
    assert p["gated_output"] == "out" and p["agreement_of"] == "mIoU"
    assert p["top1_agreement"] == pytest.approx(7 / 12) and p["pixel_agreement"] == 0.75
    assert set(p["outputs"]) == {"out", "aux"} and p["outputs"]["aux"]["max_abs_diff"] == pytest.approx(0.5)


class _Boxes(torch.nn.Module):
    """A stand-in detector's decoding: its outputs are already boxes and scores (one label)."""

    def detections(self, outputs, images):
        return [{"boxes": b, "scores": s, "labels": torch.ones(len(s), dtype=torch.int64)}
                for b, s in zip(outputs["boxes"], outputs["scores"])]


def test_a_detectors_agreement_is_map50_against_the_float_models_sure_detections():
    from compress.export.parity import detection_agreement
    boxes = np.array([[[0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 60, 60]]], np.float32)
    scores = np.array([[0.9, 0.6, 0.3]], np.float32)  # the 0.3 box is no truth: under 0.5
    moved = boxes.copy()
    moved[0, 1] += 15  # the file finds the second object elsewhere (IoU 0.14)
    p = detection_agreement(_Boxes(), ["boxes", "scores"], [boxes, scores], [moved, scores], None)
    assert p["reference_boxes"] == 2 and p["reference_score"] == 0.5
    assert 0.4 < p["top1_agreement"] < 0.6 and p["agreement_of"] == "mAP@50"  # one of two objects found
    unsure = scores * 0.5  # a detector early in training: its truth is what scores half its best or more
    same = detection_agreement(_Boxes(), ["boxes", "scores"], [boxes, unsure], [boxes, unsure], None)
    assert same["reference_boxes"] == 2 and same["reference_score"] == pytest.approx(0.225)
    assert same["top1_agreement"] == pytest.approx(1.0) and same["map_agreement"] == pytest.approx(1.0)
