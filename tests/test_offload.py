"""A model that accelerate offloads in part (to CPU memory or disk: meta weights behind hooks, as on a GPU
too small for the model under --device-map auto) is ablated, run and merged exactly like one in memory."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from heretic.ablation.adapters import Ablator
from heretic.ablation.parameters import AblationParameters, ComponentKernel
from heretic.model.architecture import build_architecture_map
from heretic.model.offload import execution_device, offloaded_entries

PARAMETERS = AblationParameters(
    "global", 1.5, {"attn": ComponentKernel(1.2, 2.0, 0.6, 2.0), "mlp": ComponentKernel(1.0, 2.0, 0.5, 2.0)}
)
IDS = torch.tensor([[1, 5, 9, 3, 7]])


def test_an_offloaded_model_is_ablated_and_merged_like_one_in_memory(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    placement = {"model.embed_tokens": "disk", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    placement |= {f"model.layers.{index}": "disk" if index % 2 else "cpu" for index in range(4)}
    models = {
        "memory": AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32),
        "offloaded": AutoModelForCausalLM.from_pretrained(
            tiny_models["llama"], dtype=torch.float32, device_map=placement, offload_folder=str(tmp_path / "offload")
        ),
    }
    assert "model.layers.1.mlp.down_proj.weight" in offloaded_entries(models["offloaded"])
    embeddings = models["offloaded"].get_input_embeddings()
    assert embeddings.weight.device.type == "meta" and execution_device(embeddings, embeddings.weight.device).type == "cpu"
    generator = torch.Generator().manual_seed(0)
    directions = torch.nn.functional.normalize(torch.randn(5, 64, generator=generator), dim=-1)
    logits, merged = {}, {}
    for kind, model in models.items():
        ablator = Ablator(model, build_architecture_map(model), "full", 3, 0)
        ablator.apply(PARAMETERS, directions)
        with torch.no_grad():
            logits[kind] = ablator.peft_model(IDS).logits
        merged[kind] = ablator.merged_state_dict(PARAMETERS, directions)
    torch.testing.assert_close(logits["offloaded"], logits["memory"], atol=1e-5, rtol=1e-5)
    assert merged["offloaded"].keys() == merged["memory"].keys()
    for name, tensor in merged["memory"].items():
        assert merged["offloaded"][name].device.type == "cpu", name
        torch.testing.assert_close(merged["offloaded"][name], tensor, atol=1e-6, rtol=1e-6, msg=name)


def test_offloaded_fused_experts_are_refused_in_one_sentence(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    import pytest

    from heretic.errors import HereticError

    model = AutoModelForCausalLM.from_pretrained(
        tiny_models["qwen3_moe"], dtype=torch.float32, device_map={"": "disk"}, offload_folder=str(tmp_path / "offload")
    )
    with pytest.raises(
        HereticError, match=r"fused expert weights of this MoE model \(model\.layers\.0\.mlp\.experts\.\w+ and \d+ more\)"
    ):
        Ablator(model, build_architecture_map(model), "full", 3, 0)
