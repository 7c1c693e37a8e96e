"""Prune, fine-tune, save and export a torchvision detector, end to end.

    python examples/prune_detector.py                               # embedded default, no download
    python examples/prune_detector.py --model fasterrcnn_resnet50_fpn --weights my_detector.pt --ratio 0.3

Steps, each reported with figures:

1. build the detector (``--weights``: a state dict of your trained model; without it a
   randomly initialised one with ``--classes + 1`` classes, trained on the synthetic
   boxes below);
2. trace it in eval *and* training mode (images + targets: ``prunekit.ModeInputs``),
   keeping the predictors (``prunekit.zoo.detection.detector_predictors``);
3. prune every hidden layer (backbone, FPN, RPN conv, RoI box head) to ``--ratio``;
4. check the prune is exact: the predictors' dense outputs equal those of the original
   whose removed channels are zeroed (``masked_reference``);
5. fine-tune with prunekit's training loop (the model computes its own losses:
   ``TrainConfig(model_loss=True)``), checkpointed and resumable in ``--out``;
6. report params, FLOPs, measured latency, held-out loss and recall@0.5 before and after;
7. save with ``prunekit.save`` (safetensors and a JSON plan, no pickle), load it back;
8. export to ONNX (the whole detector, post-processing included) and compare
   onnxruntime's boxes and scores with PyTorch's.

The data is :class:`prunekit.zoo.detection.SyntheticBoxes` (coloured rectangles on noise,
made on the fly): enough to show the recipe runs and the pruned detector recovers, not a
detection benchmark. For your data, pass a loader of ``(list of images, list of targets)``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

import prunekit as pk
from prunekit.measure import count_flops, count_params, measure_latency
from prunekit.recover import TrainConfig, train
from prunekit.runtime import model_mode
from prunekit.surgery.reference import masked_reference
from prunekit.zoo.detection import SyntheticBoxes, collate_detection, dense_outputs, detector_inputs, detector_predictors

log = logging.getLogger("prune_detector")


def build(name: str, weights: str | None, classes: int, size: int) -> nn.Module:
    """The torchvision detector ``name`` at input size ``size`` (never downloads): with
    ``weights`` (a state-dict file) as trained, else randomly initialised for ``classes`` + 1."""
    kw: dict[str, Any] = {"weights": None, "weights_backbone": None}
    if not name.startswith("ssd"):
        kw.update(min_size=size, max_size=size)
    if weights is None:
        kw["num_classes"] = classes + 1
    model = torchvision.models.get_model(name, **kw)
    if weights is not None:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("model", state) if isinstance(state, dict) else state)
    return model.eval()


@torch.no_grad()
def held_out(model: nn.Module, data: SyntheticBoxes, seed: int = 0) -> dict[str, float]:
    """Mean training-mode loss (BatchNorm frozen, the RNG seeded per image) and recall@0.5 (a
    ground-truth box counts as found when a detection of its label with score >= 0.3
    overlaps it with IoU >= 0.5) on ``data``."""
    losses, found, total = [], 0, 0
    for i in range(len(data)):
        image, target = data[i]
        torch.manual_seed(seed + i)
        with model_mode(model, "train"):
            losses.append(float(sum(model([image], [target]).values())))
        with model_mode(model, "eval"):
            det = model([image])[0]
        keep = det["scores"] >= 0.3
        iou = torchvision.ops.box_iou(target["boxes"], det["boxes"][keep])
        same = target["labels"][:, None] == det["labels"][keep][None, :]
        found += int(((iou >= 0.5) & same).any(dim=1).sum())
        total += len(target["boxes"])
    return {"loss": sum(losses) / len(losses), "recall50": found / max(total, 1)}


def profile(model: nn.Module, image: torch.Tensor, min_run_time: float) -> dict[str, float]:
    """Params, FLOPs and measured CPU latency (median over ``min_run_time`` s of timed calls,
    one thread, ms) of one eval forward on ``image``."""
    x = ([image],)
    lat = measure_latency(model, x, warmup=2, min_run_time=min_run_time, threads=1)
    return {"params": float(count_params(model)), "flops": float(count_flops(model, x)), "latency_ms": lat.median_ms}


def export(model: nn.Module, image: torch.Tensor, path: Path) -> dict[str, Any]:
    """Export the whole detector to ONNX (TorchScript exporter, opset 17: torchvision's
    detection post-processing has no dynamo export) and compare onnxruntime with PyTorch."""
    import onnxruntime as ort

    tmp = path.with_suffix(".tmp.onnx")
    with torch.no_grad():
        model.eval()
        torch.onnx.export(model, ([image],), str(tmp), opset_version=17, dynamo=False,
                          input_names=["image"], output_names=["boxes", "labels", "scores"])
        ref = model([image])[0]
    sess = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    boxes, labels, scores = sess.run(None, {sess.get_inputs()[0].name: image.numpy()})
    n = min(len(boxes), len(ref["boxes"]))
    figures = {"detections_torch": len(ref["boxes"]), "detections_onnx": int(len(boxes)),
               "max_abs_box_diff": float((torch.from_numpy(boxes[:n]) - ref["boxes"][:n]).abs().max()) if n else 0.0,
               "max_abs_score_diff": float((torch.from_numpy(scores[:n]) - ref["scores"][:n]).abs().max()) if n else 0.0,
               "bytes": tmp.stat().st_size}
    tmp.replace(path)
    return figures


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the recipe; returns (and writes to ``--out/report.json``) every figure."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="fasterrcnn_mobilenet_v3_large_320_fpn", help="torchvision detector name")
    ap.add_argument("--weights", default=None, help="state dict of a trained detector (default: random init)")
    ap.add_argument("--classes", type=int, default=3, help="foreground classes of the synthetic data (no --weights)")
    ap.add_argument("--size", type=int, default=160, help="image size (the detector's min_size/max_size)")
    ap.add_argument("--ratio", type=float, default=0.5, help="fraction of each prunable group's channels to remove")
    ap.add_argument("--pretrain-epochs", type=int, default=3, help="epochs on the synthetic data before pruning (no --weights)")
    ap.add_argument("--epochs", type=int, default=2, help="fine-tune epochs after pruning")
    ap.add_argument("--train-images", type=int, default=64)
    ap.add_argument("--test-images", type=int, default=16)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--latency-seconds", type=float, default=1.0, help="seconds of timed calls per latency")
    ap.add_argument("--out", default="runs/detector", help="directory for checkpoints, the saved model and report")
    ap.add_argument("--no-export", action="store_true", help="skip the ONNX export")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    model = build(args.model, args.weights, args.classes, args.size)
    train_set = SyntheticBoxes(args.train_images, args.size, args.classes, seed=0)
    test_set = SyntheticBoxes(args.test_images, args.size, args.classes, seed=1)
    loader = torch.utils.data.DataLoader(train_set, batch_size=4, shuffle=True, collate_fn=collate_detection,
                                         generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(epochs=args.pretrain_epochs, lr=args.lr, model_loss=True, tensorboard=False, weight_decay=1e-4)
    report: dict[str, Any] = {"model": args.model, "weights": args.weights, "ratio": args.ratio, "size": args.size}
    if args.weights is None and args.pretrain_epochs:
        t0 = time.perf_counter()
        train(model, loader, cfg, run_dir=out / "pretrain", resume=True, progress=False)
        report["pretrain_s"] = time.perf_counter() - t0
    model.eval()
    image = test_set[0][0]
    report["before"] = {**profile(model, image, args.latency_seconds), **held_out(model, test_set)}

    inputs = detector_inputs(model, size=args.size)
    ignore = detector_predictors(model)
    t0 = time.perf_counter()
    graph = pk.trace(model, inputs, ignore=ignore)
    small, plan = pk.prune(model, inputs, ratio=args.ratio, graph=graph, return_plan=True)
    report["prune_s"] = time.perf_counter() - t0
    report["kept_predictors"] = ignore
    report["repairs"] = list(plan.meta.get("repairs", []))
    ref = masked_reference(model, graph, plan)
    report["exact"] = {}
    for mode in ("eval", "train"):
        a, b = dense_outputs(small, inputs, mode), dense_outputs(ref, inputs, mode)
        report["exact"][mode] = max(float((a[k] - b[k]).abs().max() / (b[k].abs().max() + 1e-12)) for k in b)
    report["pruned_no_ft"] = {**profile(small, image, args.latency_seconds), **held_out(small, test_set)}

    t0 = time.perf_counter()
    train(small, loader, TrainConfig(**{**cfg.to_dict(), "epochs": args.epochs, "milestones": ()}),
          run_dir=out / "finetune", resume=True, progress=False)
    report["finetune_s"] = time.perf_counter() - t0
    small.eval()
    report["after"] = {**report["pruned_no_ft"], **held_out(small, test_set)}

    pk.save(small, plan, out / "pruned")
    fresh = build(args.model, None, args.classes, args.size) if args.weights is None else build(
        args.model, args.weights, args.classes, args.size)
    loaded = pk.load(out / "pruned", fresh)
    with torch.no_grad():
        a, b = loaded.eval()([image])[0], small([image])[0]
    report["reload_max_abs_diff"] = float((a["scores"] - b["scores"]).abs().max()) if len(a["scores"]) else 0.0
    if not args.no_export:
        report["onnx"] = export(small, image, out / "pruned.onnx")
    (out / "report.json").write_text(json.dumps(report, indent=2))
    for key in ("before", "pruned_no_ft", "after"):
        r = report[key]
        log.info("%-13s params %.2fM  FLOPs %.2fG  latency %.1f ms  held-out loss %.3f  recall@0.5 %.2f", key,
                 r["params"] / 1e6, r["flops"] / 1e9, r["latency_ms"], r["loss"], r["recall50"])
    log.info("exact (max relative error of the dense outputs): eval %.1e, train %.1e",
             report["exact"]["eval"], report["exact"]["train"])
    if "onnx" in report:
        log.info("onnx: %s", report["onnx"])
    return report


if __name__ == "__main__":
    main()
