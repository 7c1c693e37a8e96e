"""``hf:NAME`` models from configs, and tiny transformers models pruned for real.

Skipped as a whole when transformers is not installed. Oracles: the masked original (removed
channels' consumer weights zeroed; the base models' hidden width reaches their output, so
only heads and MLP widths go and no norm mixes pruned channels), hand counts of heads, and
the transformers behaviour we rely on (which attention path ran).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import prunekit as pk
from prunekit.surgery.reference import masked_reference
from prunekit.zoo import resolve_model
from prunekit.zoo.hf import build_hf_model, hf_config_names, hf_example_inputs, hf_head_modules
from prunekit.zoo.models import ModelNotFoundError

transformers = pytest.importorskip("transformers", reason="transformers (the 'hf' extra) is not installed")


def _config(name: str, **changes: object) -> dict:
    config = json.loads((pk.zoo.hf.CONFIG_DIR / f"{name}.json").read_text())
    config.update(changes)
    return config


@pytest.mark.parametrize("name", hf_config_names())
def test_every_bundled_config_builds_a_tiny_model_with_its_inputs(name: str) -> None:
    model = resolve_model(f"hf:{name}")
    x = hf_example_inputs(model)
    assert set(x) == ({"input_ids", "attention_mask"} if name in ("bert", "gpt2", "llama") else {"pixel_values"})
    assert sum(p.numel() for p in model.parameters()) < 300_000
    assert hf_head_modules(model) and all(hasattr(model, h) for h in hf_head_modules(model))
    with torch.no_grad():
        assert model(**x).logits.shape[0] == 1


def test_a_config_file_or_directory_builds_its_model(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(_config("llama", num_hidden_layers=1)))
    for spec in (f"hf:{tmp_path}", f"hf:{tmp_path / 'config.json'}"):
        model = resolve_model(spec)
        assert type(model).__name__ == "LlamaForCausalLM" and len(model.model.layers) == 1


@pytest.mark.parametrize("spec,error,needle", [
    ("hf:lama", ModelNotFoundError, "did you mean 'llama'"),
    ("hf:/no/such/config.json", FileNotFoundError, "does not exist"),
    ("hf:./no_such_dir/", FileNotFoundError, "does not exist"),
])
def test_a_missing_config_is_a_clear_error(spec: str, error: type, needle: str) -> None:
    with pytest.raises(error, match=needle) as info:
        resolve_model(spec)
    assert spec in str(info.value)


def test_a_directory_without_a_config_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        resolve_model(f"hf:{tmp_path}")


def _llama(tmp_path, attention: str) -> torch.nn.Module:
    path = tmp_path / f"{attention}.json"
    path.write_text(json.dumps(_config("llama", attn_implementation=attention)))
    torch.manual_seed(0)
    return build_hf_model(str(path)).model  # the base model: its hidden width is its output


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_llama_with_grouped_query_attention_loses_whole_kv_groups(attention: str, tmp_path) -> None:
    """4 query heads on 2 kv heads of 16: half the kv heads go with their query heads (by
    hand: q 64 -> 32, k and v 32 -> 16, o_proj reads 32), ``num_key_value_groups`` stays 2,
    and the output equals the masked original. The sdpa path is the grouped one."""
    model = _llama(tmp_path, attention)
    x = hf_example_inputs(model)
    graph = pk.trace(model, x)
    sdpa = [op for op in graph.ops() if op.name == "scaled_dot_product_attention"]
    if attention == "sdpa":
        assert sdpa and all(op.in_shapes[0][1] == 4 and op.in_shapes[1][1] == 2 for op in sdpa)
    else:
        assert not sdpa
    small, plan = pk.prune(model, x, ratio=0.5, graph=graph, return_plan=True)
    assert not plan.meta["repairs"]
    for layer in small.layers:
        attn = layer.self_attn
        assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features) == (32, 16, 16)
        assert attn.o_proj.in_features == 32 and attn.num_key_value_groups == 2
        assert layer.mlp.gate_proj.out_features == 64
    with torch.no_grad():
        y, ref = small(**x).last_hidden_state, masked_reference(model, graph, plan)(**x).last_hidden_state
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-5)


def test_gpt2_is_pruned_through_its_conv1d_layers_and_stays_exact() -> None:
    """GPT-2's Conv1D (addmm): 2 of 4 heads and half the MLP go in each block (by hand: c_attn
    64 -> 3 * 32 outputs, split_size 32, c_fc 256 -> 128), exactly."""
    torch.manual_seed(0)
    model = build_hf_model("gpt2").transformer
    x = hf_example_inputs(build_hf_model("gpt2"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", pk.PruningShortfallWarning)
        graph = pk.trace(model, x)
        small, plan = pk.prune(model, x, ratio=0.5, graph=graph, return_plan=True)
    assert not plan.meta["repairs"]
    for block in small.h:
        assert tuple(block.attn.c_attn.weight.shape) == (64, 96) and block.attn.c_attn.nf == 96
        assert block.attn.split_size == 32 and tuple(block.attn.c_proj.weight.shape) == (32, 64)
        assert tuple(block.mlp.c_fc.weight.shape) == (64, 128)
    with torch.no_grad():
        y, ref = small(**x).last_hidden_state, masked_reference(model, graph, plan)(**x).last_hidden_state
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-5)


def test_gpt2_with_its_head_ignored_keeps_the_tied_embedding_consistent() -> None:
    """lm_head is ignored (vocabulary kept) and shares its weight with wte: after pruning the
    hidden width, both are still one tensor, and the logits keep their shape."""
    torch.manual_seed(0)
    model = build_hf_model("gpt2")
    x = hf_example_inputs(model)
    small = pk.prune(model, x, ratio=0.5, ignore=hf_head_modules(model))
    assert small.lm_head.weight is small.transformer.wte.weight
    assert small.lm_head.weight.shape[0] == 1000 and small.lm_head.weight.shape[1] < 64
    with torch.no_grad():
        assert small(**x).logits.shape == model(**x).logits.shape


def test_tracing_a_fresh_model_leaves_it_working() -> None:
    """transformers installs output-capturing hooks on a model's first forward and flags that
    it did: tracing (on the meta device) first must keep the flag with the hooks, or the next
    forward installs them twice and SegFormer's decoder receives every hidden state twice."""
    torch.manual_seed(0)
    model = build_hf_model("segformer")
    twin = build_hf_model("segformer")
    twin.load_state_dict(model.state_dict())
    x = hf_example_inputs(model)
    pk.trace(model, x, ignore=hf_head_modules(model))
    with torch.no_grad():
        torch.testing.assert_close(model(**x).logits, twin(**x).logits, rtol=0, atol=0)
