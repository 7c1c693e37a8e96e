"""``nn.MultiheadAttention``: whole heads and the embedding pruned independently, exactly.

The oracle is the original model with the removed channels zeroed at their consumers
(:func:`prunekit.surgery.reference.masked_reference`); LayerNorms are left out of the
models (they mix channels, which the oracle cannot mirror). Every test also checks that
channels were removed, so a rule that blocks everything fails.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

import prunekit as pk
from prunekit.allocate.cost import CostModel
from prunekit.measure import count_flops
from prunekit.surgery.mha import PrunedMultiheadAttention
from prunekit.surgery.reference import masked_reference


class Attend(nn.Module):
    """Token embedding, attention with a residual add, an MLP and a pooled head. ``cross``:
    keys and values of their own widths from their own projections (separate q/k/v weights)."""

    def __init__(self, *, batch_first: bool = True, need_weights: bool = False, average: bool = True,
                 use_weights: bool = False, cross: bool = False, padding: bool = False) -> None:
        super().__init__()
        self.batch_first, self.need_weights, self.average = batch_first, need_weights, average
        self.use_weights, self.cross, self.padding = use_weights, cross, padding
        self.embed = nn.Linear(6, 16)
        self.kv = nn.Linear(6, 12) if cross else None
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first, **({"kdim": 12, "vdim": 12} if cross else {}))
        self.mlp = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 16))
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.batch_first:
            x = x.transpose(0, 1)
        h = self.embed(x)
        kv = self.kv(x) if self.kv is not None else h
        mask = None
        if self.padding:  # the last two keys of the second sequence are padding
            mask = torch.zeros(2, 5, dtype=torch.bool, device=x.device)
            mask[1, -2:] = True
        out, weights = self.attn(h, kv, kv, need_weights=self.need_weights, key_padding_mask=mask,
                                 average_attn_weights=self.average)
        h = h + out
        h = h + self.mlp(h)
        y = self.head(h.mean(1 if self.batch_first else 0))
        if self.use_weights and self.average:  # read by an op
            return y + weights.flatten(1).sum(1, keepdim=True)
        return (y, weights) if self.use_weights else y  # per-head weights: a model output


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model.eval()(x)
    return out[0] if isinstance(out, tuple) else out


def _prune(model: nn.Module, x: torch.Tensor, **options):
    model.eval()
    graph = pk.trace(model, x)
    small, plan = pk.prune(model, x, graph=graph, return_plan=True, **options)
    assert plan.meta["repairs"] == [], "the trace should have predicted every shape"
    return graph, small, plan


def _assert_exact(model: nn.Module, graph, small: nn.Module, plan, x: torch.Tensor) -> None:
    want = _outputs(masked_reference(model, graph, plan), x)
    torch.testing.assert_close(_outputs(small, x), want, rtol=1e-4, atol=1e-5 * (want.abs().max().item() + 1e-6))


def _attn_groups(graph, name: str = "attn"):
    heads = [g for g in graph.groups if g.name == name]
    return heads


X = torch.randn(2, 5, 6)


@pytest.mark.parametrize("options", [
    {"batch_first": True, "need_weights": False},
    {"batch_first": False, "need_weights": False},
    {"batch_first": True, "need_weights": True},  # weights returned by the module, then discarded
    {"batch_first": False, "need_weights": True, "padding": True},
    {"batch_first": True, "cross": True},  # kdim/vdim: separate q/k/v projection weights
    {"batch_first": False, "cross": True, "need_weights": True, "padding": True},
], ids=lambda o: "-".join(k if v is True else f"{k}={v}" for k, v in o.items()))
def test_heads_and_embedding_prune_independently_and_exactly(options: dict) -> None:
    torch.manual_seed(0)
    model = Attend(**options)
    x = X if options["batch_first"] else X.transpose(0, 1).contiguous().transpose(0, 1)
    # Heads 4 -> 2, the embedding 16 -> 12: widths the stock module cannot hold.
    graph, small, plan = _prune(model, x, ratio=0.0, group_ratios={"attn": 0.5, "embed (+2 coupled)": 0.25})
    (heads,) = _attn_groups(graph)
    assert heads.size == 4 and heads.n_prunable == 4  # one channel per head
    attn = small.attn
    assert isinstance(attn, PrunedMultiheadAttention)
    assert (attn.num_heads, attn.head_dim, attn.embed_dim, attn.out_dim) == (2, 4, 12, 12)
    proj = attn.in_proj_weight if not options.get("cross") else attn.q_proj_weight
    assert tuple(proj.shape) == ((3 * 8, 12) if not options.get("cross") else (8, 12))
    if options.get("cross"):
        assert attn.kdim == attn.vdim == 12 and tuple(attn.k_proj_weight.shape) == (8, 12)
    assert attn.out_proj.in_features == 8 and attn.out_proj.out_features == 12
    _assert_exact(model, graph, small, plan, x)
    # The pruned module traces and prunes again (the rule reads it as it reads the stock one).
    graph2, small2, plan2 = _prune(small, x, ratio=0.0, group_ratios={"attn": 0.5})
    assert small2.attn.num_heads == 1
    _assert_exact(small, graph2, small2, plan2, x)


def test_stock_module_stays_when_widths_agree() -> None:
    torch.manual_seed(0)
    model = Attend()
    graph, small, plan = _prune(model, X, ratio=0.0, group_ratios={"attn": 0.5, "embed (+2 coupled)": 0.5})
    assert type(small.attn) is nn.MultiheadAttention and not plan.structural
    assert (small.attn.embed_dim, small.attn.num_heads, small.attn.head_dim) == (8, 2, 4)
    _assert_exact(model, graph, small, plan, X)


@pytest.mark.parametrize("average", [True, False])
def test_used_attention_weights_keep_the_heads(average: bool) -> None:
    """Head-averaged weights change with every removed head (here an op reads them); per-head
    ones carry the heads, and here they reach the model output."""
    torch.manual_seed(0)
    model = Attend(need_weights=True, use_weights=True, average=average).eval()
    graph = pk.trace(model, X)
    (heads,) = _attn_groups(graph)
    assert heads.n_prunable == 0
    reason = " ".join(heads.reasons)
    assert ("head-averaged attention weights" in reason) if average else ("model output" in reason)
    # The embedding still prunes.
    small, plan = pk.prune(model, X, graph=graph, return_plan=True, ratio=0.5)
    assert small.attn.embed_dim == 8
    _assert_exact(model, graph, small, plan, X)


class Masked(nn.Module):
    """A 3-D attn_mask has ``batch * heads`` rows: the head count is fixed by that tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        mask = torch.zeros(x.shape[0] * 4, x.shape[1], x.shape[1], device=x.device)
        return self.head(h + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0])


def test_a_3d_mask_keeps_the_heads() -> None:
    graph = pk.trace(Masked().eval(), X)
    (heads,) = _attn_groups(graph)
    assert heads.n_prunable == 0 and "3-D attn_mask" in heads.reasons[0]


def _tiny_vit() -> nn.Module:
    """torchvision's ViT at 32x32, patch 8, 2 layers, hidden 32, 4 heads; LayerNorms removed for
    the oracle, a random head (torchvision zeroes it)."""
    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64,
                              num_classes=5)
    for layer in model.encoder.layers:
        layer.ln_1, layer.ln_2 = nn.Identity(), nn.Identity()
    model.encoder.ln = nn.Identity()
    nn.init.normal_(model.heads.head.weight)
    return model.eval()


def test_torchvision_vit_prunes_heads_and_embedding_exactly(tmp_path) -> None:
    model, x = _tiny_vit(), torch.randn(2, 3, 32, 32)
    graph, small, plan = _prune(model, x, ratio=0.5, group_ratios={"conv_proj (+4 coupled)": 0.25})
    for layer in small.encoder.layers:
        attn = layer.self_attention
        assert (attn.embed_dim, attn.num_heads, attn.head_dim) == (24, 2, 8)
    _assert_exact(model, graph, small, plan, x)
    # FLOPs: the cost model agrees with the pruned model's count, and both fell well below half.
    cost = CostModel(graph, model, x)
    flops = count_flops(small, x)
    assert float(cost.flops(cost.mask_of_plan(plan))) == flops < 0.5 * count_flops(model, x)
    # The plan round-trips through JSON and rebuilds the pruned model from a fresh original.
    pk.save(small, plan, tmp_path / "vit")
    loaded = pk.load(tmp_path / "vit", _tiny_vit())
    torch.testing.assert_close(_outputs(loaded, x), _outputs(small, x), rtol=0, atol=0)
    pytest.importorskip("onnxruntime")
    from prunekit.export import export_onnx

    assert export_onnx(small, x, tmp_path / "vit.onnx")["match"]
