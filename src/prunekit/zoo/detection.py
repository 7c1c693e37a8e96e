"""torchvision detectors: what pruning must keep, example inputs for both modes, the dense
outputs an exact prune preserves, and a small synthetic detection data set.

A detector's *predictors* (the layers whose output channels are classes, box
coordinates, anchors, mask classes or keypoints) must keep their outputs; everything
before them (backbone, FPN, RPN and RoI-head hidden layers, mask/keypoint head convs) is
prunable. Its final outputs (boxes after NMS) depend on values, so a prune is checked on
the *dense* outputs instead: what the predictors compute, which an exact prune leaves as
the masked reference computes them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from prunekit.graph.tracer import tensors_in
from prunekit.runtime import ModeInputs, call, inputs_for, model_mode

__all__ = ["detector_predictors", "detector_inputs", "dense_outputs", "SyntheticBoxes", "collate_detection"]

# Predictor module classes (torchvision.models.detection) -> the children that are the
# predictor (None: the whole module).
_PREDICTORS: dict[str, tuple[str, ...] | None] = {
    "RPNHead": ("cls_logits", "bbox_pred"),
    "FastRCNNPredictor": None,
    "MaskRCNNPredictor": ("mask_fcn_logits",),
    "KeypointRCNNPredictor": None,
    "RetinaNetClassificationHead": ("cls_logits",),
    "RetinaNetRegressionHead": ("bbox_reg",),
    "FCOSClassificationHead": ("cls_logits",),
    "FCOSRegressionHead": ("bbox_reg", "bbox_ctrness"),
}
_SSD_HEADS = ("SSDClassificationHead", "SSDRegressionHead", "SSDLiteClassificationHead", "SSDLiteRegressionHead")


def detector_predictors(model: nn.Module) -> list[str]:
    """Qualified names of ``model``'s predictor modules (pass them as ``ignore``): the
    layers whose output channels mean classes, boxes, anchors, masks or keypoints, for
    every torchvision detector (Faster/Mask/Keypoint R-CNN, RetinaNet, FCOS, SSD, SSDlite).
    Raises ValueError for a model with none of them."""
    names: list[str] = []
    for name, module in model.named_modules():
        kind = type(module).__name__
        prefix = name + "." if name else ""
        if kind in _PREDICTORS:
            children = _PREDICTORS[kind]
            names.extend([name] if children is None else [prefix + c for c in children if hasattr(module, c)])
        elif kind in _SSD_HEADS:
            # One predictor conv per feature map: the last conv of each entry of module_list.
            for i, entry in enumerate(module.module_list):
                convs = [n for n, m in entry.named_modules() if isinstance(m, nn.Conv2d)]
                names.append(f"{prefix}module_list.{i}" + (f".{convs[-1]}" if convs and convs[-1] else ""))
    if not names:
        raise ValueError(f"{type(model).__name__}: no torchvision detection predictor found "
                         "(expected an RPN, RoI, RetinaNet, FCOS or SSD head)")
    return names


def _targets(model: nn.Module, size: int, generator: torch.Generator) -> dict[str, Tensor]:
    """Two boxes of class 1, plus masks / keypoints when ``model`` predicts them."""
    boxes = torch.tensor([[0.1, 0.15, 0.45, 0.5], [0.4, 0.3, 0.9, 0.85]]) * size
    # Class 1 exists in every detector (a keypoint R-CNN has no other).
    target: dict[str, Tensor] = {"boxes": boxes, "labels": torch.tensor([1, 1])}
    heads = {type(m).__name__ for m in model.modules()}
    if "MaskRCNNPredictor" in heads:
        masks = torch.zeros(2, size, size, dtype=torch.uint8)
        for j, (x0, y0, x1, y1) in enumerate(boxes.round().long().tolist()):
            masks[j, y0:y1, x0:x1] = 1
        target["masks"] = masks
    if "KeypointRCNNPredictor" in heads:
        n = model.roi_heads.keypoint_predictor.kps_score_lowres.out_channels
        lo, hi = boxes[:, None, :2], boxes[:, None, 2:]
        xy = lo + torch.rand(2, n, 2, generator=generator) * (hi - lo)
        target["keypoints"] = torch.cat([xy, torch.ones(2, n, 1)], dim=2)
    return target


def detector_inputs(model: nn.Module, size: int = 320, batch: int = 1, seed: int = 0) -> ModeInputs:
    """Example inputs for a torchvision detector: ``(images,)`` in eval mode and
    ``(images, targets)`` in training mode (two boxes per image, with masks or keypoints
    when the model has those heads), ``batch`` random ``3 x size x size`` images."""
    gen = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, size, size, generator=gen) for _ in range(batch)]
    targets = [_targets(model, size, gen) for _ in range(batch)]
    return ModeInputs(eval=(images,), train=(images, targets))


@torch.no_grad()
def dense_outputs(model: nn.Module, example_inputs: Any, mode: str = "eval", seed: int = 0) -> dict[str, Tensor]:
    """The dense tensors a detector computes on ``example_inputs`` in ``mode``: every
    predictor's outputs (name -> the outputs of all its calls, flattened and
    concatenated), and in training mode also each loss. The RNG is seeded with ``seed``
    first, so the training pass samples the same anchors and proposals every time."""
    got: dict[str, list[Tensor]] = {}
    hooks = []
    for name in detector_predictors(model):
        def hook(_m: nn.Module, _args: Any, out: Any, name: str = name) -> None:
            got.setdefault(name, []).extend(t.reshape(-1) for t in tensors_in(out))
        hooks.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        with torch.random.fork_rng(devices=[]):  # the caller's RNG stream is left as it was
            torch.manual_seed(seed)
            with model_mode(model, mode):
                out = call(model, inputs_for(example_inputs, mode))
    finally:
        for h in hooks:
            h.remove()
    result = {k: torch.cat(v) for k, v in got.items()}
    if mode == "train" and isinstance(out, dict):
        result.update({f"loss:{k}": v.reshape(1) for k, v in out.items()})
    return result


class SyntheticBoxes(torch.utils.data.Dataset):
    """A small detection data set made on the fly, no download: ``n`` images of noise with
    one to three axis-aligned rectangles, each filled with one of ``classes`` colours; the
    target is torchvision's ``{"boxes", "labels"}`` (labels 1..classes, 0 is background).
    Deterministic per index and ``seed``."""

    def __init__(self, n: int = 64, size: int = 160, classes: int = 3, seed: int = 0) -> None:
        if n < 1 or size < 32 or not 1 <= classes <= 8:
            raise ValueError(f"SyntheticBoxes: n={n} (>= 1), size={size} (>= 32), classes={classes} (1..8)")
        self.n, self.size, self.classes, self.seed = n, size, classes, seed
        hues = torch.linspace(0, 2 * math.pi, classes + 1)[:classes]
        self.colours = torch.stack([0.5 + 0.5 * torch.cos(hues + k * 2 * math.pi / 3) for k in range(3)], dim=1)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        gen = torch.Generator().manual_seed(self.seed * 100_003 + i)
        s = self.size
        image = 0.15 * torch.rand(3, s, s, generator=gen)
        count = int(torch.randint(1, 4, (1,), generator=gen))
        boxes, labels = [], []
        for _ in range(count):
            w, h = (torch.randint(s // 6, s // 2, (2,), generator=gen)).tolist()
            x0 = int(torch.randint(0, s - w, (1,), generator=gen))
            y0 = int(torch.randint(0, s - h, (1,), generator=gen))
            c = int(torch.randint(0, self.classes, (1,), generator=gen))
            image[:, y0:y0 + h, x0:x0 + w] = self.colours[c][:, None, None]
            boxes.append([x0, y0, x0 + w, y0 + h])
            labels.append(c + 1)
        return image, {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels)}


def collate_detection(batch: list[tuple[Tensor, dict[str, Tensor]]]) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Collate detection samples into (list of images, list of targets), torchvision's input format."""
    return [b[0] for b in batch], [b[1] for b in batch]
