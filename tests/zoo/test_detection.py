"""torchvision detectors prune whole (backbone, FPN, heads' hidden layers), exactly on the
dense outputs in eval and training mode, with the predictors kept; the recipe runs end to end."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import prunekit as pk
from prunekit.surgery.reference import masked_reference
from prunekit.zoo.detection import SyntheticBoxes, dense_outputs, detector_inputs, detector_predictors

ROOT = Path(__file__).resolve().parents[2]

PREDICTORS = {
    "fasterrcnn_mobilenet_v3_large_320_fpn": ["rpn.head.cls_logits", "rpn.head.bbox_pred", "roi_heads.box_predictor"],
    "maskrcnn_resnet50_fpn": ["rpn.head.cls_logits", "rpn.head.bbox_pred", "roi_heads.box_predictor",
                              "roi_heads.mask_predictor.mask_fcn_logits"],
    "keypointrcnn_resnet50_fpn": ["rpn.head.cls_logits", "rpn.head.bbox_pred", "roi_heads.box_predictor",
                                  "roi_heads.keypoint_predictor"],
    "retinanet_resnet50_fpn": ["head.classification_head.cls_logits", "head.regression_head.bbox_reg"],
    "fcos_resnet50_fpn": ["head.classification_head.cls_logits", "head.regression_head.bbox_reg",
                          "head.regression_head.bbox_ctrness"],
    "ssd300_vgg16": [f"head.{h}_head.module_list.{i}" for h in ("classification", "regression") for i in range(6)],
    "ssdlite320_mobilenet_v3_large": [f"head.{h}_head.module_list.{i}.1" for h in ("classification", "regression")
                                      for i in range(6)],
}


@pytest.mark.parametrize("name", sorted(PREDICTORS))
def test_predictors_of_every_torchvision_detector(name: str) -> None:
    with torch.device("meta"):
        model = torchvision.models.get_model(name, weights=None, weights_backbone=None)
    assert sorted(detector_predictors(model)) == sorted(PREDICTORS[name])
    for n in detector_predictors(model):
        model.get_submodule(n)  # each names a real module


def test_a_model_without_predictors_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no torchvision detection predictor"):
        detector_predictors(nn.Sequential(nn.Conv2d(3, 4, 1)))


def _check_prune(model: nn.Module, size: int) -> tuple[nn.Module, pk.PruningPlan]:
    inputs = detector_inputs(model, size=size)
    graph = pk.trace(model, inputs, ignore=detector_predictors(model))
    assert set(graph.state.ops) == {"eval", "train"}
    small, plan = pk.prune(model, inputs, ratio=0.5, graph=graph, return_plan=True)
    assert plan.meta["repairs"] == []
    ref = masked_reference(model, graph, plan)
    for mode in ("eval", "train"):
        got, want = dense_outputs(small, inputs, mode), dense_outputs(ref, inputs, mode)
        assert got.keys() == want.keys() and (mode == "eval" or any(k.startswith("loss:") for k in want))
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5 * float(want[k].abs().max()) + 1e-7)
    for n in detector_predictors(model):  # what the predictors produce is untouched
        for (pn, p), (_, q) in zip(model.get_submodule(n).named_parameters(), small.get_submodule(n).named_parameters()):
            assert p.shape[0] == q.shape[0], pn
    return small, plan


def test_ssdlite_prunes_whole_and_exactly() -> None:
    torch.manual_seed(0)
    model = torchvision.models.get_model("ssdlite320_mobilenet_v3_large", weights=None, weights_backbone=None).eval()
    small, _ = _check_prune(model, 160)
    assert sum(p.numel() for p in small.parameters()) < 0.45 * sum(p.numel() for p in model.parameters())


def test_faster_rcnn_prunes_backbone_fpn_rpn_and_box_head_exactly() -> None:
    torch.manual_seed(0)
    model = torchvision.models.get_model("fasterrcnn_mobilenet_v3_large_320_fpn", weights=None,
                                         weights_backbone=None, min_size=96, max_size=96).eval()
    small, _ = _check_prune(model, 96)
    assert small.backbone.fpn.inner_blocks[0][0].out_channels < model.backbone.fpn.inner_blocks[0][0].out_channels
    assert small.rpn.head.conv[0][0].out_channels < model.rpn.head.conv[0][0].out_channels
    assert small.roi_heads.box_head.fc6.out_features == model.roi_heads.box_head.fc6.out_features // 2
    assert small.roi_heads.box_predictor.cls_score.out_features == model.roi_heads.box_predictor.cls_score.out_features


def test_synthetic_boxes_are_deterministic_and_drawn() -> None:
    data = SyntheticBoxes(4, 64, classes=3, seed=5)
    a, b = data[2], SyntheticBoxes(4, 64, classes=3, seed=5)[2]
    torch.testing.assert_close(a[0], b[0])
    image, target = a
    for (x0, y0, x1, y1), label in zip(target["boxes"].long().tolist(), target["labels"].tolist()):
        assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64 and 1 <= label <= 3
    x0, y0, x1, y1 = target["boxes"][-1].long().tolist()  # the last box drawn is fully visible
    torch.testing.assert_close(image[:, y0:y1, x0:x1], data.colours[target["labels"][-1] - 1][:, None, None]
                               .expand(3, y1 - y0, x1 - x0))
    with pytest.raises(ValueError, match="SyntheticBoxes"):
        SyntheticBoxes(0)


@pytest.mark.slow
def test_the_detector_recipe_runs_end_to_end(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    spec = importlib.util.spec_from_file_location("prune_detector", ROOT / "examples" / "prune_detector.py")
    recipe = importlib.util.module_from_spec(spec)
    sys.modules["prune_detector"] = recipe
    spec.loader.exec_module(recipe)
    report = recipe.main(["--size", "96", "--train-images", "4", "--test-images", "2", "--pretrain-epochs", "1",
                          "--epochs", "1", "--latency-seconds", "0.05", "--out", str(tmp_path)])
    assert report["exact"]["eval"] < 1e-4 and report["exact"]["train"] < 1e-4
    assert report["after"]["params"] < 0.5 * report["before"]["params"]
    assert report["after"]["flops"] < 0.5 * report["before"]["flops"]
    assert report["reload_max_abs_diff"] < 1e-5
    assert report["onnx"]["detections_onnx"] == report["onnx"]["detections_torch"]
    assert report["onnx"]["max_abs_score_diff"] < 1e-4
    assert (tmp_path / "report.json").exists() and (tmp_path / "pruned.onnx").exists()
    assert (tmp_path / "finetune" / "checkpoint.pt").exists()
