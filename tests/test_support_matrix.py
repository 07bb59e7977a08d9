"""The families people use most go through the whole pipeline (tests/support_matrix.py) and must work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support_matrix import MUST_WORK, check_architecture, pick_layers, shrink, tiny_config, unablated_writes

from heretic.ablation.kernels import through_norm


@pytest.mark.parametrize("model_type", MUST_WORK)
def test_the_family_works(model_type: str, tmp_path: Path) -> None:
    """Float32 here (bfloat16 too in the matrix, `make support-matrix`), to keep the default suite fast."""
    result = check_architecture(model_type, tmp_path, other_dtypes=())
    assert result.status == "works", result.sentence
    assert result.dtypes == {"float32": "finite"}
    assert result.components and result.gguf


def test_layer_lists_keep_one_layer_of_each_kind() -> None:
    """A pattern of three linear-attention layers and a full one keeps its first period; one whose second
    kind comes late keeps the first layer of each kind; per-layer dicts and index lists follow."""
    kinds = ["linear", "linear", "linear", "full"] * 12
    assert pick_layers({"layer_types": kinds}, 48) == [0, 1, 2, 3]
    late = ["sliding"] * 20 + ["full"] * 4
    assert pick_layers({"layer_types": late}, 24) == [0, 1, 2, 20]
    per_layer = {"20": {"head_dim": 512}, "21": {"head_dim": 512}, "22": {"head_dim": 512}, "23": {"head_dim": 512}}
    config = shrink({"num_hidden_layers": 24, "layer_types": late, "mlp_only_layers": [1], "per_layer_config": per_layer})
    assert config["num_hidden_layers"] == 4 and config["layer_types"] == ["sliding"] * 3 + ["full"]
    assert config["mlp_only_layers"] == [1] and config["per_layer_config"] == {"03": {"head_dim": 16}}


def test_the_tiny_configs_are_small() -> None:
    config = tiny_config("deepseek_v3")
    assert (config.num_hidden_layers, config.hidden_size, config.n_routed_experts, config.vocab_size) == (4, 64, 4, 512)
    assert config.first_k_dense_replace == 1 and config.qk_head_dim == config.qk_nope_head_dim + config.qk_rope_head_dim


def test_the_residual_check_names_the_weight_a_map_misses(monkeypatch: pytest.MonkeyPatch) -> None:
    """Independent of the map: a map that leaves the MLPs out leaves their writes along r, and the check
    names the MLP's output projection."""
    import heretic.model.architecture as architecture

    assert unablated_writes("llama") == ""
    build = architecture.build_architecture_map

    def without_mlp(model: torch.nn.Module) -> architecture.ArchitectureMap:
        arch = build(model)
        for layer in arch.layers:
            layer["mlp"] = []
        return arch

    monkeypatch.setattr(architecture, "build_architecture_map", without_mlp)
    missed = unablated_writes("llama")
    assert missed.startswith("layer 0 writes") and "mlp.down_proj" in missed and "self_attn.o_proj" not in missed


def test_post_norms_are_ablated_through(monkeypatch: pytest.MonkeyPatch) -> None:
    """Gemma 2 normalizes each block's output (weights g) before adding it: ablating r in o_proj and down_proj
    leaves g * y / rms(y) with a component along r; the direction g * r / |g * r| removes it."""
    import heretic.model.architecture as architecture

    assert unablated_writes("gemma2") == ""
    monkeypatch.setattr(architecture, "post_norms", lambda layer: {})
    missed = unablated_writes("gemma2")
    assert "post_attention_layernorm" in missed and "post_feedforward_layernorm" in missed


def test_through_norm_removes_the_write_along_r() -> None:
    """r . (g * (y - (y . u) u)) = 0 for u = g * r / |g * r|, for a direction and for a basis."""
    generator = torch.Generator().manual_seed(0)
    g, y = torch.rand(16, generator=generator) + 0.5, torch.randn(5, 16, generator=generator)
    r = torch.nn.functional.normalize(torch.randn(16, generator=generator), dim=0)
    u = through_norm(r, g)
    assert torch.allclose(((g * (y - (y @ u)[:, None] * u)) @ r).abs().max(), torch.tensor(0.0), atol=1e-5)
    basis = torch.linalg.qr(torch.randn(16, 2, generator=generator))[0].T  # (2, 16) orthonormal
    v = through_norm(basis, g)
    projected = y - (y @ v.T) @ v
    assert ((g * projected) @ basis.T).abs().max() < 1e-5
