"""Reusing the original's prompt passes below a trial's first changed layer (model/reuse.py): exact, and
only where it applies."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny import PROMPTS

from heretic.ablation.adapters import Ablator, first_changed_layer
from heretic.ablation.parameters import AblationParameters, ComponentKernel
from heretic.model.architecture import build_architecture_map
from heretic.model.generation import Engine
from heretic.model.loading import eos_token_ids, load_model
from heretic.model.reuse import LayerReuse
from heretic.prompts import Prompt

OTHER = [Prompt("You are a helpful assistant.", "Name a colour.")]

# Kernels of 4-layer models that change layers 2 and 3 only (peak at 3, reach 1).
UPPER_LAYERS = AblationParameters(
    "global", 1.5, {"attn": ComponentKernel(1.2, 3.0, 0.6, 1.0), "mlp": ComponentKernel(1.0, 3.0, 0.5, 1.0)}
)


def setup(path: Path, batch_size: int = 2) -> tuple[Engine, Ablator, LayerReuse, torch.Tensor]:
    loaded = load_model(str(path), dtypes=["float32"], cache_dir="cache")
    arch = build_architecture_map(loaded.model)
    ablator = Ablator(loaded.model, arch, "full", 3, 0)
    engine = Engine(loaded.model, loaded.tokenizer, eos_token_ids(loaded), batch_size=batch_size)
    reuse = LayerReuse(list(loaded.model.get_submodule(arch.layers_path)), lambda: ablator.unchanged_layers)
    torch.manual_seed(0)
    directions = torch.nn.functional.normalize(torch.randn(arch.num_layers + 1, arch.hidden_size), dim=-1)
    return engine, ablator, reuse, directions


def passes(engine: Engine, ids: list[list[int]]) -> tuple[torch.Tensor, list[list[int]]]:
    responses = engine.generate(ids, 12)
    assert responses is not None
    return engine.first_logprobs(ids), responses


def test_the_first_changed_layer_follows_the_kernels(tiny_models: dict[str, Path]) -> None:
    _, ablator, _, directions = setup(tiny_models["llama"])
    assert ablator.unchanged_layers == 4  # nothing applied: every layer is the original's
    ablator.apply(UPPER_LAYERS, directions)
    assert ablator.unchanged_layers == first_changed_layer(UPPER_LAYERS, ablator.arch) == 2
    everywhere = AblationParameters("per-layer", 0.0, {"attn": ComponentKernel(1.0, 2.0, 1.0, 3.0)})
    ablator.apply(everywhere, directions)
    assert ablator.unchanged_layers == 0
    ablator.reset()
    assert ablator.unchanged_layers == 4


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3_moe"])
def test_a_trial_pass_that_starts_at_its_first_changed_layer_equals_a_whole_pass(kind: str, tiny_models: dict[str, Path]) -> None:
    engine, ablator, reuse, directions = setup(tiny_models[kind])
    ids = engine.encode(PROMPTS)
    engine.reuse = reuse
    with reuse.recording_original():
        original = passes(engine, ids)
    assert len(reuse.records) == 3 and 0 < reuse.used <= reuse.budget  # batches of 2, 2 and 1 prompts
    assert reuse.skipped_layers == 3 * 3  # the KL pass over the batches the prefill recorded: all but the last layer
    reuse.skipped_layers = 0

    ablator.apply(UPPER_LAYERS, directions)
    reused = passes(engine, ids)
    assert reuse.skipped_layers == 2 * 2 * 3  # two passes (KL, prefill) of three batches skipped layers 0 and 1
    assert all("forward" not in vars(layer) for layer in reuse.layers)  # the layers are restored after each pass
    engine.reuse = None
    whole = passes(engine, ids)
    assert torch.allclose(reused[0], whole[0], atol=1e-5, rtol=0)
    assert reused[1] == whole[1]
    assert not torch.allclose(whole[0], original[0], atol=1e-3)  # the ablation changed the model

    ablator.reset()  # the original again: a pass starts at the last layer and reads its recorded input
    engine.reuse = reuse
    again = passes(engine, ids)
    assert torch.allclose(again[0], original[0], atol=1e-5, rtol=0) and again[1] == original[1]


def test_passes_over_unrecorded_batches_and_other_caches_run_whole(tiny_models: dict[str, Path]) -> None:
    engine, ablator, reuse, directions = setup(tiny_models["llama"])
    engine.reuse = reuse
    with reuse.recording_original():
        engine.first_logprobs(engine.encode(PROMPTS))
    ablator.apply(UPPER_LAYERS, directions)
    engine.first_logprobs(engine.encode(OTHER))  # never recorded
    assert reuse.skipped_layers == 0
    subset = engine.encode(PROMPTS[:3])  # batched otherwise: some batches were recorded, some not
    recorded = [reuse.key(batch.prefix, batch.suffixes) in reuse.records for batch in engine.batches(subset)]
    assert any(recorded) and not all(recorded)
    reused = engine.first_logprobs(subset)
    assert reuse.skipped_layers == 2 * sum(recorded)
    engine.reuse = None
    assert torch.allclose(reused, engine.first_logprobs(subset), atol=1e-5, rtol=0)

    # Sliding-window attention keeps another cache: nothing is recorded, passes run whole.
    engine, ablator, reuse, directions = setup(tiny_models["gemma3"])
    engine.reuse = reuse
    with reuse.recording_original():
        engine.first_logprobs(engine.encode(PROMPTS))
    assert reuse.records == {}


def test_recording_stops_at_its_memory_budget_and_only_for_the_original(tiny_models: dict[str, Path]) -> None:
    engine, ablator, reuse, directions = setup(tiny_models["llama"])
    engine.reuse = reuse
    ids = engine.encode(PROMPTS)
    ablator.apply(UPPER_LAYERS, directions)
    with reuse.recording_original():
        engine.first_logprobs(ids)
    assert reuse.records == {}  # an ablated model is not the original: nothing recorded
    ablator.reset()
    reuse.budget = 1
    with reuse.recording_original():
        engine.first_logprobs(ids)
    assert reuse.records == {}
    engine.first_logprobs(ids)  # outside recording_original: nothing either
    assert reuse.records == {}


def test_replay_keeps_accelerate_hooks_and_places_records_on_each_layers_device(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """A model dispatched by accelerate over several places (here CPU and disk offload: the same hooks a
    multi-GPU map installs) keeps each layer's hook wrapper through a replay, and the replay equals a
    whole pass."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from heretic.model.loading import prepare_tokenizer
    from heretic.model.offload import execution_device

    placement = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    placement |= {f"model.layers.{index}": "disk" if index % 2 else "cpu" for index in range(4)}
    model = AutoModelForCausalLM.from_pretrained(
        tiny_models["llama"], dtype=torch.float32, device_map=placement, offload_folder=str(tmp_path / "offload")
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    prepare_tokenizer(tokenizer)
    layers = list(model.model.layers)
    wrappers = [vars(layer).get("forward") for layer in layers]
    assert sum(wrapper is not None for wrapper in wrappers) >= 2  # accelerate's hooks sit on the offloaded layers
    assert all(execution_device(layer, torch.device("meta")) == torch.device("cpu") for layer in layers)
    engine = Engine(model, tokenizer, {tokenizer.eos_token_id}, batch_size=2)
    ids = engine.encode(PROMPTS)
    whole = engine.first_logprobs(ids)
    unchanged = [len(layers)]
    engine.reuse = reuse = LayerReuse(layers, lambda: unchanged[0])
    with reuse.recording_original():
        engine.first_logprobs(ids)
    assert reuse.records
    unchanged[0] = 3  # a pass starts at layer 3, an offloaded layer, and skips one of them
    reused = engine.first_logprobs(ids)
    assert reuse.skipped_layers > 0
    assert [vars(layer).get("forward") for layer in layers] == wrappers  # every hook wrapper is back
    assert torch.allclose(reused, whole, atol=1e-5, rtol=0)
    engine.reuse = None
    assert torch.allclose(engine.first_logprobs(ids), whole, atol=1e-5, rtol=0)  # the hooks still place the weights
