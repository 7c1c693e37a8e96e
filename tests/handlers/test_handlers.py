"""Every registered layer handler against independent oracles: FlopCounterMode for FLOPs,
the module's own forward for channel dims and slicing, numpy's SVD for factorisation.

A handler is tested as soon as it is registered: ``SAMPLES`` must name modules for it."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

import prunekit.handlers as handlers
from prunekit.handlers import LayerHandler, handler_for, list_handlers, register_handler
from prunekit.handlers.attention import MultiheadAttentionHandler
from prunekit.handlers.conv import ConvHandler
from prunekit.handlers.embedding import EmbeddingHandler
from prunekit.handlers.linear import LinearHandler
from prunekit.handlers.norm import NormHandler
from prunekit.handlers.prelu import PReLUHandler
from prunekit.surgery import fix_module_attrs


def _forward(m: nn.Module, x: Tensor) -> Tensor:
    return m(x)


@dataclass
class Sample:
    """A module for a handler, an input for it, and what to expect."""

    build: Callable[[], nn.Module]
    input: Callable[[], Tensor]
    call: Callable[[nn.Module, Tensor], Tensor] = _forward
    attrs: Callable[[int], dict[str, Any]] = dict  # expected size attributes with n output channels
    factorisable: frozenset[str] = frozenset()  # factorise kinds that must give a replacement
    exact_slice: bool = True  # keeping output channels keeps exactly those of the output
    channelwise: bool = False  # output channel c depends on input channel c only
    shrink: Callable[[nn.Module], Tensor] | None = None  # hand-slices the module, returns kept channels
    slices: bool = True  # the handler's slice() supports it
    out_param: Callable[[nn.Module], tuple[Tensor, int, Tensor | None]] | None = None  # (weight, out dim, bias)


def _randn(*shape: int) -> Callable[[], Tensor]:
    return lambda: torch.randn(*shape)


def _mha(m: nn.Module, x: Tensor) -> Tensor:
    """Self-attention; keys/values of their own widths (fixed random) when kdim/vdim differ."""
    if m._qkv_same_embed_dim:
        return m(x, x, x)[0]
    g = torch.Generator().manual_seed(1)
    k = torch.randn(*x.shape[:-1], m.kdim, generator=g, dtype=x.dtype)
    v = torch.randn(*x.shape[:-1], m.vdim, generator=g, dtype=x.dtype)
    return m(x, k, v)[0]


def _shrink_mha(m: nn.Module) -> Tensor:
    """Keep the first head's embed channels in every projection (the model width shrinks too)."""
    keep = torch.arange(m.head_dim)
    e = m.embed_dim
    rows = torch.cat([keep, keep + e, keep + 2 * e])

    def cut(name: str, rows: Tensor | None, cols: Tensor | None, owner: nn.Module = m) -> None:
        t = getattr(owner, name)
        if t is None:
            return
        t = t[rows] if rows is not None else t
        t = t[..., cols] if cols is not None else t
        setattr(owner, name, nn.Parameter(t.detach().clone()))

    if m._qkv_same_embed_dim:
        cut("in_proj_weight", rows, keep)
    else:
        cut("q_proj_weight", keep, keep)
        cut("k_proj_weight", keep, None)
        cut("v_proj_weight", keep, None)
    cut("in_proj_bias", rows, None)
    cut("bias_k", None, keep)
    cut("bias_v", None, keep)
    cut("weight", keep, keep, m.out_proj)
    cut("bias", keep, None, m.out_proj)
    return keep


def _out_proj(m: nn.Module) -> tuple[Tensor, int, Tensor | None]:
    return m.out_proj.weight, 0, m.out_proj.bias


CONV_OUT = lambda n: {"out_channels": n}  # noqa: E731
SAMPLES: dict[type[LayerHandler], list[Sample]] = {
    ConvHandler: [
        Sample(lambda: nn.Conv2d(4, 6, 3, padding=1), _randn(2, 4, 7, 7), attrs=CONV_OUT,
               factorisable=frozenset({"channel", "spatial"})),
        Sample(lambda: nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(2, 1), dilation=(2, 1), bias=False),
               _randn(2, 4, 9, 8), attrs=CONV_OUT, factorisable=frozenset({"channel", "spatial"})),
        Sample(lambda: nn.Conv2d(3, 5, 3, padding="same", padding_mode="reflect"), _randn(1, 3, 6, 6),
               attrs=CONV_OUT, factorisable=frozenset({"channel", "spatial"})),
        Sample(lambda: nn.Conv2d(4, 6, 3), _randn(4, 8, 8), attrs=CONV_OUT,  # unbatched
               factorisable=frozenset({"channel", "spatial"})),
        Sample(lambda: nn.Conv2d(4, 6, (1, 3)), _randn(2, 4, 5, 5), attrs=CONV_OUT, factorisable=frozenset({"channel"})),
        Sample(lambda: nn.Conv1d(3, 5, 3, stride=2), _randn(2, 3, 11), attrs=CONV_OUT, factorisable=frozenset({"channel"})),
        Sample(lambda: nn.Conv3d(2, 4, (2, 3, 3), padding=1), _randn(1, 2, 4, 5, 5), attrs=CONV_OUT,
               factorisable=frozenset({"channel"})),
        Sample(lambda: nn.Conv2d(4, 6, 3, groups=2), _randn(2, 4, 6, 6), attrs=CONV_OUT, slices=False),
        Sample(lambda: nn.Conv2d(4, 4, 3, groups=4, padding=1), _randn(2, 4, 6, 6), channelwise=True,
               attrs=lambda n: {"in_channels": n, "out_channels": n, "groups": n}),
        Sample(lambda: nn.ConvTranspose2d(4, 6, 3, stride=2), _randn(2, 4, 5, 5), attrs=CONV_OUT),
        Sample(lambda: nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2), _randn(2, 4, 5, 5), attrs=CONV_OUT,
               slices=False),
        Sample(lambda: nn.ConvTranspose1d(3, 5, 3), _randn(2, 3, 7), attrs=CONV_OUT),
    ],
    LinearHandler: [
        Sample(lambda: nn.Linear(5, 3), _randn(4, 5), attrs=lambda n: {"out_features": n},
               factorisable=frozenset({"channel"})),
        Sample(lambda: nn.Linear(5, 7, bias=False), _randn(2, 6, 5), attrs=lambda n: {"out_features": n},
               factorisable=frozenset({"channel"})),
    ],
    NormHandler: [
        Sample(lambda: nn.BatchNorm2d(4), _randn(2, 4, 5, 5), attrs=lambda n: {"num_features": n}, channelwise=True),
        Sample(lambda: nn.BatchNorm1d(4), _randn(6, 4), attrs=lambda n: {"num_features": n}, channelwise=True),
        Sample(lambda: nn.InstanceNorm2d(4, affine=True), _randn(2, 4, 5, 5), attrs=lambda n: {"num_features": n},
               channelwise=True),
        Sample(lambda: nn.InstanceNorm1d(4, affine=True), _randn(4, 6), attrs=lambda n: {"num_features": n},
               channelwise=True),  # unbatched: channels are dim 0
        Sample(lambda: nn.GroupNorm(2, 4), _randn(2, 4, 5, 5), attrs=lambda n: {"num_channels": n}, exact_slice=False),
        Sample(lambda: nn.LayerNorm(6), _randn(2, 3, 6), attrs=lambda n: {"normalized_shape": (n,)}, exact_slice=False),
        *([Sample(lambda: nn.RMSNorm(6), _randn(2, 3, 6), attrs=lambda n: {"normalized_shape": (n,)},
                  exact_slice=False)] if hasattr(nn, "RMSNorm") else []),
    ],
    EmbeddingHandler: [
        Sample(lambda: nn.Embedding(10, 6), lambda: torch.randint(0, 10, (2, 5)), attrs=lambda n: {"embedding_dim": n}),
    ],
    PReLUHandler: [
        # Negative inputs: the output is slope * input, so a zeroed slope zeroes its channel.
        Sample(lambda: nn.PReLU(4), lambda: -torch.rand(2, 4, 5, 5) - 0.1, attrs=lambda n: {"num_parameters": n},
               channelwise=True),
    ],
    MultiheadAttentionHandler: [
        Sample(lambda: nn.MultiheadAttention(8, 2, batch_first=True), _randn(2, 5, 8), call=_mha,
               out_param=_out_proj, shrink=_shrink_mha, exact_slice=False, slices=False,
               attrs=lambda n: {"embed_dim": n, "num_heads": 1, "head_dim": 4, "kdim": n, "vdim": n}),
        Sample(lambda: nn.MultiheadAttention(8, 2), _randn(5, 3, 8), call=_mha,  # (length, batch, E)
               out_param=_out_proj, shrink=_shrink_mha, exact_slice=False, slices=False,
               attrs=lambda n: {"embed_dim": n, "num_heads": 1, "head_dim": 4}),
        Sample(lambda: nn.MultiheadAttention(8, 4, kdim=6, vdim=4, add_bias_kv=True, add_zero_attn=True),
               _randn(6, 8), call=_mha, out_param=_out_proj, shrink=_shrink_mha, exact_slice=False, slices=False,  # unbatched
               attrs=lambda n: {"embed_dim": n, "num_heads": 1, "head_dim": 2, "kdim": 6, "vdim": 4}),
    ],
}

HANDLERS = list_handlers()


def _samples(handler: LayerHandler) -> list[Sample]:
    samples = SAMPLES.get(type(handler))
    assert samples, f"{type(handler).__name__} is registered but has no sample in SAMPLES"
    return samples


def _module(sample: Sample, handler: LayerHandler) -> nn.Module:
    torch.manual_seed(0)
    m = sample.build().eval()
    assert handler_for(m) is handler
    return m


@pytest.fixture(autouse=True)
def _no_mha_fastpath():
    # The fused fast path of nn.MultiheadAttention is invisible to FlopCounterMode.
    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    yield
    torch.backends.mha.set_fastpath_enabled(was)


def _channels(n_w: int, total: int, picked: list[int]) -> list[int]:
    """Output channels of weight channels ``picked`` when a weight dim of ``n_w`` serves
    ``total`` channels (a transposed grouped conv's weight indexes channels within a group)."""
    return sorted(c + j * n_w for c in picked for j in range(total // n_w))


def _out_param(sample: Sample, handler: LayerHandler, m: nn.Module) -> tuple[Tensor, int, Tensor | None]:
    if sample.out_param is not None:
        return sample.out_param(m)
    dim = handler.weight_dims(m)[0]
    assert dim is not None
    return m.weight, dim, getattr(m, "bias", None)


@pytest.mark.parametrize("handler", HANDLERS, ids=lambda h: type(h).__name__)
def test_flops_match_flop_counter(handler: LayerHandler) -> None:
    for sample in _samples(handler):
        m, x = _module(sample, handler), sample.input()
        counter = FlopCounterMode(display=False)
        with counter:
            y = sample.call(m, x)
        expected = counter.get_total_flops()
        assert handler.flops(m, tuple(x.shape), tuple(y.shape)) == expected, m


@pytest.mark.parametrize("handler", HANDLERS, ids=lambda h: type(h).__name__)
def test_params_count_every_parameter_once(handler: LayerHandler) -> None:
    for sample in _samples(handler):
        m = _module(sample, handler)
        tensors = {id(v): v.numel() for v in m.state_dict(keep_vars=True).values() if isinstance(v, nn.Parameter)}
        assert handler.params(m) == sum(tensors.values()), m


@pytest.mark.parametrize("handler", HANDLERS, ids=lambda h: type(h).__name__)
def test_out_channel_dim_holds_the_weights_channels(handler: LayerHandler) -> None:
    for sample in _samples(handler):
        m, x = _module(sample, handler), sample.input()
        y = sample.call(m, x)
        d = handler.out_channel_dim(m, y.ndim)
        assert d is not None, m
        w, wdim, b = _out_param(sample, handler, m)
        n_w, c = w.shape[wdim], 1
        expected = _channels(n_w, y.shape[d], [c])
        with torch.no_grad():
            w.select(wdim, c).zero_()
            if b is not None:
                b[expected] = 0
            y = sample.call(m, x)
        zeroed = [i for i in range(y.shape[d]) if not y.select(d, i).any()]
        assert zeroed == expected, m


@pytest.mark.parametrize("handler", HANDLERS, ids=lambda h: type(h).__name__)
def test_in_channel_dim_holds_the_consumed_channels(handler: LayerHandler) -> None:
    for sample in _samples(handler):
        m, x = _module(sample, handler), sample.input()
        d = handler.in_channel_dim(m, x.ndim)
        if isinstance(handler, EmbeddingHandler):
            assert d is None  # indices, no channels
            continue
        assert d is not None, m
        y = sample.call(m, x)
        wdim = handler.weight_dims(m)[1]
        c = 1
        if wdim is not None:
            # Input channel c read through weight slice c: zeroing it makes the output blind to c.
            picked = _channels(m.weight.shape[wdim], x.shape[d], [c])
            bumped = x.clone()
            bumped.index_add_(d, torch.tensor(picked), torch.ones_like(x.index_select(d, torch.tensor(picked))))
            assert not torch.allclose(sample.call(m, bumped), y), m
            with torch.no_grad():
                m.weight.select(wdim, c).zero_()
            torch.testing.assert_close(sample.call(m, bumped), sample.call(m, x))
        else:
            bumped = x.clone()
            # Random per-element scales: keeps signs, changes what a norm cannot normalise away.
            bumped.select(d, c).mul_(torch.rand_like(bumped.select(d, c)) + 0.5)
            out_d = handler.out_channel_dim(m, y.ndim)
            changed = [i for i in range(y.shape[out_d])
                       if not torch.allclose(sample.call(m, bumped).select(out_d, i), y.select(out_d, i))]
            assert c in changed, m
            if sample.channelwise:
                assert changed == [c], m


def _svd_approx(mat: np.ndarray, rank: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(mat, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vt[:rank]


def _rank_r_weight(w: Tensor, rank: int, kind: str) -> Tensor:
    """The weight rebuilt from the rank-r SVD of its reshaped matrix (numpy, the oracle)."""
    a = w.detach().numpy()
    if kind == "channel":
        return torch.from_numpy(_svd_approx(a.reshape(a.shape[0], -1), rank).reshape(a.shape))
    n, c, kh, kw = a.shape
    approx = _svd_approx(a.transpose(1, 2, 0, 3).reshape(c * kh, n * kw), rank)
    return torch.from_numpy(approx.reshape(c, kh, n, kw).transpose(2, 0, 1, 3).copy())


def _rel_err(a: Tensor, b: Tensor) -> float:
    return float(((a - b).norm() / b.norm()).detach())


@pytest.mark.parametrize("handler", HANDLERS, ids=lambda h: type(h).__name__)
def test_factorise_full_rank_exact_low_rank_is_svd(handler: LayerHandler) -> None:
    for sample in _samples(handler):
        for kind in ("channel", "spatial"):
            m = _module(sample, handler).double()
            x = sample.input()
            x = x.double() if x.is_floating_point() else x
            full = handler.factorise(m, 10_000, kind=kind)
            assert (full is not None) == (kind in sample.factorisable), (m, kind)
            if full is None:
                continue
            y = sample.call(m, x)
            assert _rel_err(full(x), y) < 1e-5, (m, kind)
            rank = 2
            low = handler.factorise(m, rank, kind=kind)
            oracle = copy.deepcopy(m)
            with torch.no_grad():
                oracle.weight.copy_(_rank_r_weight(m.weight, rank, kind))
            assert low is not None and low[0].weight.shape[0] == rank
            assert _rel_err(low(x), oracle(x)) < 1e-8, (m, kind)
            assert _rel_err(low(x), y) > 1e-3  # rank 2 really is an approximation here


@pytest.mark.parametrize("handler", HANDLERS, ids=lambda h: type(h).__name__)
def test_rank_matrix_is_what_factorise_truncates(handler: LayerHandler) -> None:
    """The rank matrix has the weight's entries, writes back to the weight, and its rank-2 SVD
    truncation written back is the weight numpy's reshape gives (the factorisation's oracle)."""
    for sample in _samples(handler):
        for kind in ("channel", "spatial"):
            m = _module(sample, handler).double()
            matrix = handler.rank_matrix(m, kind)
            assert (matrix is not None) == (kind in sample.factorisable), (m, kind)
            if matrix is None:
                continue
            assert matrix.ndim == 2 and matrix.numel() == m.weight.numel()
            assert torch.equal(handler.weight_from_rank_matrix(m, matrix, kind), m.weight)
            u, s, vt = torch.linalg.svd(matrix.detach(), full_matrices=False)
            low = handler.weight_from_rank_matrix(m, (u[:, :2] * s[:2]) @ vt[:2], kind)
            torch.testing.assert_close(low, _rank_r_weight(m.weight, 2, kind), rtol=0, atol=1e-10)


@pytest.mark.parametrize("handler", HANDLERS, ids=lambda h: type(h).__name__)
def test_fix_attrs_after_hand_slicing(handler: LayerHandler) -> None:
    for sample in _samples(handler):
        m, x = _module(sample, handler), sample.input()
        y = sample.call(m, x)
        out_d = handler.out_channel_dim(m, y.ndim)
        if sample.shrink is not None:
            kept = sample.shrink(m)
        else:
            assert handler.weight_dims(m)[0] is not None, f"{m}: give its sample a shrink"
            w, wdim, _ = _out_param(sample, handler, m)
            picked = [0, w.shape[wdim] - 1]
            kept = torch.tensor(_channels(w.shape[wdim], y.shape[out_d], picked))
            with torch.no_grad():
                m.weight = nn.Parameter(w.index_select(wdim, torch.tensor(picked)))
                for name, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
                    if name != "weight" and t.ndim == 1 and len(t) == y.shape[out_d]:
                        setattr(m, name, type(t)(t.index_select(0, kept)) if isinstance(t, nn.Parameter)
                                else t.index_select(0, kept))
        per_channel = handler.weight_dims(m)[1] is None and handler.in_channel_dim(m, x.ndim) is not None
        if per_channel or sample.shrink is not None:
            x = x.index_select(handler.in_channel_dim(m, x.ndim), kept)
        fixes = fix_module_attrs(m)
        expected = sample.attrs(len(kept))
        assert {k: getattr(m, k) for k in expected} == expected, m
        assert fixes, m  # something was out of date and got fixed
        out = sample.call(m, x)
        assert out.shape[out_d] == len(kept)
        if sample.exact_slice:
            torch.testing.assert_close(out, y.index_select(out_d, kept))


@pytest.mark.parametrize("handler", HANDLERS, ids=lambda h: type(h).__name__)
def test_slice_keeps_the_chosen_channels(handler: LayerHandler) -> None:
    """Where a handler slices: keeping output channels keeps exactly those of the output;
    keeping input channels equals the original layer with the dropped inputs zeroed."""
    for sample in _samples(handler):
        m, x = _module(sample, handler), sample.input()
        y = sample.call(m, x)
        out_d, in_d = handler.out_channel_dim(m, y.ndim), handler.in_channel_dim(m, x.ndim)
        keep = torch.tensor([0, 2])
        sliced = copy.deepcopy(m)
        try:
            handler.slice(sliced, "out", keep)
        except NotImplementedError:
            assert not sample.slices, m
            continue
        assert sample.slices, m
        assert {k: getattr(sliced, k) for k in sample.attrs(2)} == sample.attrs(2), m
        per_channel = handler.weight_dims(m)[1] is None and in_d is not None
        xs = x.index_select(in_d, keep) if per_channel else x
        if sample.exact_slice:
            torch.testing.assert_close(sample.call(sliced, xs), y.index_select(out_d, keep))
        if handler.weight_dims(m)[1] is not None:
            sliced, keep_in = copy.deepcopy(m), torch.tensor([0, x.shape[in_d] - 1])
            handler.slice(sliced, "in", keep_in)
            zeroed = torch.zeros_like(x).index_copy(in_d, keep_in, x.index_select(in_d, keep_in))
            torch.testing.assert_close(sample.call(sliced, x.index_select(in_d, keep_in)), sample.call(m, zeroed))


def test_most_specific_registration_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handlers, "_REGISTRY", dict(handlers._REGISTRY))

    class Scaled(nn.Linear):
        pass

    @register_handler
    class ScaledHandler(LinearHandler):
        kinds = (Scaled,)

    # Registering the base type again later must not take the subclass back.
    again = register_handler(LinearHandler())
    assert isinstance(handler_for(Scaled(2, 2)), ScaledHandler)
    assert handler_for(nn.Linear(2, 2)) is again
    assert handler_for(nn.ReLU()) is None
    assert any(isinstance(h, ScaledHandler) for h in list_handlers())


def test_base_handler_defaults() -> None:
    base, m = LayerHandler(), nn.Linear(3, 2)
    assert base.out_channel_dim(m, 2) is None and base.weight_dims(m) == (None, None)
    assert base.factorise(m, 1) is None and base.flops(m, (1, 3), (1, 2)) == 0
    with pytest.raises(NotImplementedError):
        base.slice(m, "out", torch.tensor([0]))
    with pytest.raises(ValueError):
        register_handler(LayerHandler())


def test_unfold_input_matches_the_layer() -> None:
    """Rows of unfold_input times the flattened weight reproduce the layer's output."""
    for m, x in [(nn.Conv2d(3, 4, 3, stride=2, padding=1), torch.randn(2, 3, 7, 7)),
                 (nn.Conv1d(3, 4, 3, dilation=2), torch.randn(2, 3, 9)), (nn.Linear(5, 3), torch.randn(2, 4, 5))]:
        h = handler_for(m)
        assert h.unfolds(m)
        rows = h.unfold_input(m, x)
        y = m(x)
        d = h.out_channel_dim(m, y.ndim)
        torch.testing.assert_close(rows @ m.weight.flatten(1).T + m.bias, y.movedim(d, -1).reshape(-1, y.shape[d]))
    assert not handler_for(nn.Conv2d(4, 4, 3, groups=2)).unfolds(nn.Conv2d(4, 4, 3, groups=2))
    assert not handler_for(nn.ConvTranspose2d(3, 4, 3)).unfolds(nn.ConvTranspose2d(3, 4, 3))
