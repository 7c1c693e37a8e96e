"""Issue 15, items 6 (channel multiplier, spatial padding, functional depthwise groups) and 7
(nn.MultiheadAttention): kept FLOPs/params fractions and exactness of real models on CPU.

    python benchmarks/issue15_mha_convs.py vit_b_16 224          # ratio 0.5, LayerNorm kept
    python benchmarks/issue15_mha_convs.py vit_b_16 64 --no-ln   # LayerNorms removed: exact vs masked reference,
                                                                 # ratio 0.5 / target_flops 0.5 / global ranking, ONNX
    python benchmarks/issue15_mha_convs.py vit_b_16 64 --heads   # heads only (LayerNorm kept: exact), ONNX
    python benchmarks/issue15_mha_convs.py fastvit_t8 64         # timm models: ratio 0.5, exactness
    python benchmarks/issue15_mha_convs.py tf_efficientnet_b0 64
    python benchmarks/issue15_mha_convs.py tresnet_m 64

Exactness is the relative max error against ``masked_reference`` (meaningless through a
LayerNorm that loses channels, hence ``--no-ln`` and ``--heads`` for the ViT).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import prunekit as pk
from prunekit.measure import count_flops, count_params
from prunekit.surgery.reference import masked_reference


def _build(name: str, size: int, no_ln: bool) -> nn.Module:
    torch.manual_seed(0)
    if name == "vit_b_16":
        import torchvision

        model = torchvision.models.vit_b_16(image_size=size)
        nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision starts it at zero
        if no_ln:
            for layer in model.encoder.layers:
                layer.ln_1, layer.ln_2 = nn.Identity(), nn.Identity()
            model.encoder.ln = nn.Identity()
        return model.eval()
    import timm

    return timm.create_model(name, pretrained=False).eval()


def _row(model: nn.Module, x: torch.Tensor, graph, label: str, onnx: bool, **options) -> None:
    t = time.time()
    small, plan = pk.prune(model, x, graph=graph, return_plan=True, **options)
    seconds = time.time() - t
    with torch.no_grad():
        y, r = small(x), masked_reference(model, graph, plan)(x)
    err = float((y - r).abs().max() / r.abs().max())
    replaces = sum(type(s).__name__ == "Replace" for s in plan.steps)
    print(f"{label}: flops {count_flops(small, x) / count_flops(model, x):.4f} "
          f"params {count_params(small) / count_params(model):.4f} exact {err:.2e} repairs {len(plan.meta['repairs'])} "
          f"replaced attention modules {replaces} inferred attrs {len(plan.meta.get('inferred_attrs', []))} "
          f"({seconds:.1f} s)")
    if onnx:
        from prunekit.export import export_onnx

        with tempfile.TemporaryDirectory() as d:
            print(f"   onnx max abs diff {export_onnx(small, x, Path(d) / 'm.onnx')['max_abs_diff']:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("size", type=int)
    parser.add_argument("--no-ln", action="store_true", help="ViT: LayerNorms replaced by identities")
    parser.add_argument("--heads", action="store_true", help="ViT: prune only the attention heads, by half")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = _build(args.model, args.size, args.no_ln)
    x = torch.randn(1, 3, args.size, args.size)
    graph = pk.trace(model, x)
    one = sum(1 for g in graph.groups if g.size == 1)
    print(f"{args.model}@{args.size}: {len(graph.groups)} groups ({one} of one channel), {graph.n_channels} channels, "
          f"{graph.n_channels - sum(g.n_prunable for g in graph.groups)} blocked")
    if args.heads:
        heads = {g.name: 0.5 for g in graph.groups if g.name.endswith("self_attention")}
        _row(model, x, graph, "heads 0.5", True, ratio=0.0, group_ratios=heads)
        return
    _row(model, x, graph, "ratio 0.5", args.no_ln)
    if args.no_ln:
        _row(model, x, graph, "target_flops 0.5", True, target_flops=0.5)
        _row(model, x, graph, "ratio 0.5 global", True, ratio=0.5, global_ranking=True)


if __name__ == "__main__":
    main()
