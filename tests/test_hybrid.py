"""Hybrid and unusual layers: what the architecture map ablates in each, and that the ablation is exact there."""

from __future__ import annotations

import pytest
import torch
from tiny import make_hybrid, make_model

from heretic.ablation.adapters import Ablator
from heretic.ablation.parameters import AblationParameters, ComponentKernel
from heretic.errors import HereticError
from heretic.model.architecture import as_matrices, build_architecture_map

# Per layer, what the map ablates (module paths relative to the layer), as ArchitectureMap.describe() says it.
EXPECTED = {
    "jamba": [
        "attn: mamba.out_proj.weight; mlp: feed_forward.down_proj.weight",
        "attn: self_attn.o_proj.weight; mlp: feed_forward.experts.down_proj",
    ],
    "bamba": [
        "attn: mamba.out_proj.weight; mlp: feed_forward.down_proj.weight",
        "attn: self_attn.o_proj.weight; mlp: feed_forward.down_proj.weight",
    ],
    "falcon_h1": ["attn: mamba.out_proj.weight, self_attn.o_proj.weight; mlp: feed_forward.down_proj.weight"] * 2,
    "granitemoehybrid": [
        "attn: mamba.out_proj.weight; mlp: block_sparse_moe.experts.down_proj, shared_mlp.output_linear.weight",
        "attn: self_attn.o_proj.weight; mlp: block_sparse_moe.experts.down_proj, shared_mlp.output_linear.weight",
    ],
    "lfm2": [
        "attn: conv.out_proj.weight; mlp: feed_forward.w2.weight",
        "attn: self_attn.out_proj.weight; mlp: feed_forward.w2.weight",
    ],
    "gpt_oss": ["attn: self_attn.o_proj.weight; mlp: mlp.experts.down_proj"] * 2,
    "llama4_text": [
        "attn: self_attn.o_proj.weight; mlp: feed_forward.experts.down_proj, feed_forward.shared_expert.down_proj.weight"
    ]
    * 2,
    "qwen3_next": [
        "attn: linear_attn.out_proj.weight; mlp: mlp.experts.down_proj, mlp.shared_expert.down_proj.weight",
        "attn: self_attn.o_proj.weight; mlp: mlp.experts.down_proj, mlp.shared_expert.down_proj.weight",
    ],
}
IDS = torch.tensor([[5, 17, 42, 99, 7, 200, 13]])


def _parameters(weight: float = 1.0) -> AblationParameters:
    kernel = ComponentKernel(max_weight=weight, max_weight_position=1.5, min_weight=weight, min_weight_distance=10.0)
    return AblationParameters("global", 1.3, {"attn": kernel, "mlp": kernel})


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_the_map_lists_what_each_kind_of_layer_ablates(kind: str) -> None:
    arch = build_architecture_map(make_hybrid(kind))
    assert arch.num_layers == 4 and arch.components == ["attn", "mlp"]
    expected = [f"layer {index}: {EXPECTED[kind][index % 2]}" for index in range(4)]
    assert arch.describe() == expected
    assert arch.unrecognized == [] and arch.unrecognized_warning() is None


@pytest.mark.parametrize("kind", ["jamba", "granitemoehybrid", "lfm2", "gpt_oss", "llama4_text"])
def test_ablation_is_exact_in_hybrid_layers(kind: str) -> None:
    """Adapters and merged weights give the same logits, and every ablated matrix (weight 1, no
    normalization) has lost its component along the direction: v^T M' = 0."""
    model = make_hybrid(kind)
    arch = build_architecture_map(model)
    torch.manual_seed(1)
    directions = torch.nn.functional.normalize(torch.randn(5, 64), dim=-1)
    ablator = Ablator(model, arch, "none", 1, 0)
    parameters = _parameters()
    merged = ablator.merged_state_dict(parameters, directions)
    with torch.no_grad():
        before = model(IDS).logits
        ablator.apply(parameters, directions)
        with_adapters = model(IDS).logits
    fresh = make_hybrid(kind, seed=5)
    fresh.load_state_dict(merged, strict=True)
    with torch.no_grad():
        merged_logits = fresh(IDS).logits
    assert not torch.allclose(before, with_adapters, atol=1e-3)
    torch.testing.assert_close(merged_logits, with_adapters, atol=1e-4, rtol=1e-4)
    for layer, _, target in arch.targets():
        v = parameters.direction_for(directions, layer)
        matrices = as_matrices(merged[target.name], target)  # (experts, hidden, in)
        residue = torch.einsum("o,eoi->ei", v, matrices).abs().max()
        assert residue < 1e-4, target.name


def test_gpt_oss_experts_are_ablated_on_their_hidden_axis() -> None:
    """gpt-oss stores its experts' down projections as (experts, in, hidden): the map says so."""
    model = make_hybrid("gpt_oss")
    fused = [target for _, _, target in build_architecture_map(model).targets() if target.fused]
    assert len(fused) == 4
    for target in fused:
        weight = getattr(model.get_submodule(target.module), target.parameter)
        assert weight.shape[target.out_axis] == 64 and target.out_axis == 2


def test_llama4_experts_are_ablated_on_their_hidden_axis() -> None:
    """Llama 4 stores its experts' down projections as (experts, in, hidden) without saying so (no
    `is_transposed`): the map finds the hidden axis from the shape."""
    model = make_hybrid("llama4_text")
    fused = [target for _, _, target in build_architecture_map(model).targets() if target.fused]
    assert len(fused) == 4
    for target in fused:
        weight = getattr(model.get_submodule(target.module), target.parameter)
        assert weight.shape == (4, 96, 64) and target.out_axis == 2


@pytest.mark.parametrize(
    ("model_type", "sentence"),
    [
        ("qwen4_exp_text", "keeps 4 residual streams that its layers mix"),
        ("gemma3n_text", "keeps 4 residual streams that its layers mix"),
        ("ergo", "rescales the residual stream dimension by dimension"),
        ("inkling_text", "convolves each block's output over positions"),
        ("minimax", "normalizes the residual stream itself"),
        ("dbrx", "down projections .*mlp.w2 are stacked in one 2-D tensor"),
        ("longcat_flash", "routes tokens to identity experts"),
    ],
)
def test_layers_no_direction_can_be_removed_from_are_refused(model_type: str, sentence: str) -> None:
    """Several residual streams, a residual stream rescaled or normalized channel by channel, block outputs
    convolved over positions, experts stacked in a 2-D tensor: one sentence, not a partial ablation."""
    from support_matrix import tiny_model

    with pytest.raises(HereticError, match=sentence):
        build_architecture_map(tiny_model(model_type))


def test_xlstm_ablates_its_mlstm_and_feed_forward_outputs() -> None:
    from support_matrix import tiny_model

    arch = build_architecture_map(tiny_model("xlstm"))
    assert arch.layer_kinds() == ["layers 0-3: attn: mlstm_layer.out_proj.weight; mlp: ffn.proj_down.weight"]
    assert arch.unrecognized == []


def test_jetmoe_attention_experts_are_ablated_as_attention() -> None:
    """JetMoE's attention is a mixture of experts: their fused output projections (experts, hidden, in) under
    `self_attention.experts` are the attention's, beside the MLP experts'."""
    from support_matrix import tiny_model

    arch = build_architecture_map(tiny_model("jetmoe"))
    assert arch.layer_kinds() == ["layers 0-3: attn: self_attention.experts.output_linear.weight; mlp: mlp.output_linear.weight"]
    assert all(target.fused and target.out_axis == 1 for _, _, target in arch.targets()) and arch.unrecognized == []


def test_unrecognized_weights_are_reported() -> None:
    """Zamba 2's hybrid layers add their transformer block's output through a plain `linear`: not
    ablated, and named in the warning."""
    arch = build_architecture_map(make_hybrid("zamba2"))
    assert arch.unrecognized == ["model.layers.1.linear", "model.layers.3.linear"]
    warning = arch.unrecognized_warning()
    assert warning is not None and "model.layers.1.linear" in warning and "not recognized" in warning


def test_weights_shared_between_layers_are_refused() -> None:
    model = make_model("llama")
    model.model.layers[3].self_attn = model.model.layers[1].self_attn
    with pytest.raises(HereticError, match=r"shares the weight .* between layers 1 and 3; ablating weights shared"):
        build_architecture_map(model)


def test_a_pure_state_space_model_ablates_its_mixers() -> None:
    import transformers as tf

    model = tf.MambaForCausalLM(tf.MambaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, state_size=4))
    arch = build_architecture_map(model)  # a pure state-space model: its mixers' out_proj are the token mixers
    assert arch.describe() == ["layer 0: attn: mixer.out_proj.weight", "layer 1: attn: mixer.out_proj.weight"]


def test_the_tiny_families_have_no_unrecognized_weights() -> None:
    from tiny import KINDS

    for kind in KINDS:
        assert build_architecture_map(make_model(kind)).unrecognized == [], kind


def test_layers_of_each_kind_are_listed_together() -> None:
    arch = build_architecture_map(make_hybrid("jamba"))
    assert arch.layer_kinds() == [
        "layers 0, 2: attn: mamba.out_proj.weight; mlp: feed_forward.down_proj.weight",
        "layers 1, 3: attn: self_attn.o_proj.weight; mlp: feed_forward.experts.down_proj",
    ]
    assert build_architecture_map(make_model("llama")).layer_kinds() == [
        "layers 0-3: attn: self_attn.o_proj.weight; mlp: mlp.down_proj.weight"
    ]
