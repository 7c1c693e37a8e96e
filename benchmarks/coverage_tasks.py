"""torchvision models beyond classification for the coverage benchmark (source ``tasks``):
detection, segmentation, video and optical flow, each with its example inputs, the layers
whose outputs mean classes/boxes/flow (kept, as the classifier is for the other sources)
and the dense output an exact prune preserves.

Detectors are fed ``prunekit.ModeInputs`` (images, and images + targets in training mode)
at 256 px (``min_size``/``max_size`` of the R-CNN/RetinaNet/FCOS transforms; SSD keeps its
own size) and checked on their predictors' dense outputs
(:func:`prunekit.zoo.detection.dense_outputs`), since the boxes that survive NMS depend on
values (an R-CNN's RoI predictors are left out: they run on the proposals NMS keeps).
Torch-Pruning gets the eval inputs (it traces one forward).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

DETECTION = ["ssdlite320_mobilenet_v3_large", "fasterrcnn_mobilenet_v3_large_320_fpn", "fasterrcnn_mobilenet_v3_large_fpn",
             "ssd300_vgg16", "retinanet_resnet50_fpn", "fcos_resnet50_fpn", "fasterrcnn_resnet50_fpn",
             "maskrcnn_resnet50_fpn", "keypointrcnn_resnet50_fpn"]
SEGMENTATION = ["lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large", "fcn_resnet50", "deeplabv3_resnet50"]
VIDEO = ["r3d_18", "mc3_18", "r2plus1d_18", "s3d", "swin3d_t", "mvit_v2_s"]
FLOW = ["raft_small"]
DETECTOR_SIZE = 256

# Head layers whose output channels are classes / flow, besides detectors' predictors.
_HEADS = {
    "lraspp_mobilenet_v3_large": ["classifier.low_classifier", "classifier.high_classifier"],
    "deeplabv3_mobilenet_v3_large": ["classifier.4"],
    "fcn_resnet50": ["classifier.4", "aux_classifier.4"],
    "deeplabv3_resnet50": ["classifier.4", "aux_classifier.4"],
    "r3d_18": ["fc"], "mc3_18": ["fc"], "r2plus1d_18": ["fc"], "s3d": ["classifier.1"], "swin3d_t": ["head"],
    "mvit_v2_s": ["head.1"],
    "raft_small": ["update_block.flow_head.conv2"],
}


def names() -> list[str]:
    """Every model of the source, small families first."""
    return DETECTION + SEGMENTATION + VIDEO + FLOW


def is_detector(name: str) -> bool:
    """Whether ``name`` is one of the detectors (checked on dense outputs)."""
    return name in DETECTION


def construct(name: str) -> nn.Module:
    """The randomly initialised model (no download); segmentation models with their
    auxiliary head where torchvision has one."""
    import torchvision

    kw: dict[str, Any] = {"weights": None, "weights_backbone": None} if name not in VIDEO + FLOW else {"weights": None}
    if name in DETECTION and not name.startswith("ssd"):
        kw.update(min_size=DETECTOR_SIZE, max_size=DETECTOR_SIZE)
    if name in ("fcn_resnet50", "deeplabv3_resnet50"):
        kw["aux_loss"] = True
    return torchvision.models.get_model(name, **kw)


def example_input(name: str, model: nn.Module, seed: int) -> Any:
    """Seeded example inputs: detector ModeInputs, a (1, 3, 224, 224) image, a (1, 3, 16,
    112, 112) clip (224 px for MViT-v2 and S3D), or RAFT's two (1, 3, 128, 128) frames."""
    gen = torch.Generator().manual_seed(seed)
    if name in DETECTION:
        from prunekit.zoo.detection import detector_inputs

        size = 320 if name.startswith("ssdlite") else 300 if name.startswith("ssd") else DETECTOR_SIZE
        return detector_inputs(model, size=size, seed=seed)
    if name in VIDEO:
        shape = (1, 3, 16, 224, 224) if name.startswith(("mvit", "s3d")) else (1, 3, 16, 112, 112)
        return torch.randn(shape, generator=gen)
    if name in FLOW:
        return (torch.randn(1, 3, 128, 128, generator=gen), torch.randn(1, 3, 128, 128, generator=gen))
    return torch.randn(1, 3, 224, 224, generator=gen)


def kept_layers(name: str, model: nn.Module) -> list[nn.Module]:
    """The layers whose outputs keep their channels (predictors, classifiers, flow head)."""
    if name in DETECTION:
        from prunekit.zoo.detection import detector_predictors

        return [model.get_submodule(n) for n in detector_predictors(model)]
    return [model.get_submodule(n) for n in _HEADS[name]]


def eval_inputs(x: Any) -> Any:
    """What one eval forward takes (a detector's ``(images,)``), for tools without modes."""
    from prunekit.runtime import inputs_for

    return inputs_for(x, "eval")


@torch.no_grad()
def dense_output(name: str, model: nn.Module, x: Any) -> torch.Tensor:
    """The output an exact prune preserves: a detector's predictor outputs (concatenated),
    a segmentation model's ``out``, RAFT's last flow estimate, a video model's logits."""
    from prunekit.runtime import call_model

    if name in DETECTION:
        from prunekit.zoo.detection import dense_outputs

        # An R-CNN's RoI predictors run on the proposals that survive NMS: near-ties among
        # random-init objectness scores flip on float noise, so their count (not the prune's
        # exactness) differs run to run; they are left out here (tests/zoo/test_detection.py
        # checks them where the proposals agree).
        outs = {k: v for k, v in dense_outputs(model, x, "eval").items() if not k.startswith("roi_heads.")}
        return torch.cat([v.reshape(-1) for v in outs.values()])
    model.eval()
    out = call_model(model, x)
    if isinstance(out, dict):
        return out["out"]
    if isinstance(out, (list, tuple)):
        return out[-1]
    return out
