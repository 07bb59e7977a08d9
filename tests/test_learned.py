"""Learned refusal directions: the optimization on a model with planted features, and the pipeline's
learned direction (cache, determinism, hooks) on a tiny random model."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from heretic.config import DirectionMethod, Settings
from heretic.directions import learned
from heretic.directions.learned import Examples, Problem, optimize_direction, residual_edits
from heretic.model.generation import Engine
from heretic.model.loading import eos_token_ids, load_model
from heretic.prompts import Prompt
from heretic.session import compute_directions

HIDDEN = 16
U, V, GATE = 0, 1, 2  # the refusal feature, the nuisance feature, where the nuisance gate writes
# Tokens: 0 padding, 1 the refusal feature, 2 a weak nuisance (harmful prompts), 3 a strong one (some harmless
# prompts), 4-11 fillers; 12-14 the answers (refuse, plain answer, nuisance answer), which embed to zero.
REFUSE, PLAIN, NUISANCE = 12, 13, 14
VOCAB = 15


class CausalSum(nn.Module):
    """Each position's hidden state becomes the sum of the unpadded ones up to it: the prompt's features
    reach every answer position (a one-line stand-in for attention)."""

    def forward(self, hidden: Tensor, mask: Tensor) -> Tensor:
        return (hidden * mask.unsqueeze(-1)).cumsum(dim=1)


class NuisanceGate(nn.Module):
    """h + softplus(4 (h . v - 2)) / 4 e_gate: only a strong nuisance feature (harmless prompts') changes the answer."""

    def forward(self, hidden: Tensor, mask: Tensor) -> Tensor:
        gate = torch.nn.functional.softplus(4 * (hidden[..., V] - 2)) / 4
        return hidden + gate.unsqueeze(-1) * torch.eye(HIDDEN)[GATE]


class Planted(nn.Module):
    """A decoder-like model with a planted refusal feature u = e_0 (answer REFUSE: logit 30 h.u - 4) and a
    nuisance feature v = e_1 that changes the answer only above about 2 (NUISANCE: logit 10 h.e_gate).
    Harmful prompts carry u and v (1.2); an eighth of the harmless ones carry v (3.0), so the difference of
    means mixes u and v, while refusal reads u alone and the harmless answers depend on v."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        embedding = torch.zeros(VOCAB, HIDDEN)
        embedding[1, U], embedding[2, V], embedding[3, V] = 1.0, 1.2, 3.0
        embedding[4:12, 3:] = 0.05 * torch.randn(8, HIDDEN - 3, generator=generator)
        self.embed = nn.Embedding.from_pretrained(embedding)
        self.layers = nn.ModuleList([CausalSum(), NuisanceGate()])
        self.head = nn.Linear(HIDDEN, VOCAB)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.fill_(-30.0)
            self.head.weight[REFUSE, U], self.head.bias[REFUSE] = 30.0, -4.0
            self.head.bias[PLAIN] = 2.0
            self.head.weight[NUISANCE, GATE], self.head.bias[NUISANCE] = 10.0, 0.0

    def forward(self, input_ids: Tensor, attention_mask: Tensor, logits_to_keep: int = 0, **_: Any) -> SimpleNamespace:
        hidden = self.embed(input_ids)
        for layer in self.layers:
            hidden = layer(hidden, attention_mask.float())
        return SimpleNamespace(logits=self.head(hidden[:, -logits_to_keep:]))


def greedy(model: Planted, prompts: list[list[int]], tokens: int = 3) -> Examples:
    answers = []
    for prompt in prompts:
        ids = list(prompt)
        for _ in range(tokens):
            logits = model(torch.tensor([ids]), torch.ones(1, len(ids)), 1).logits
            ids.append(int(logits[0, -1].argmax()))
        answers.append(ids[len(prompt) :])
    return Examples(prompts, answers)


def read_residual(model: Planted, prompts: list[list[int]], index: int) -> Tensor:
    """The residual at `index` at each prompt's last position: (prompts, hidden)."""
    read: list[Tensor] = []

    def keep(at: int, hidden: Tensor) -> Tensor:
        if at == index:
            read.append(hidden[0, -1])
        return hidden

    with residual_edits(model.layers, keep):
        for prompt in prompts:
            model(torch.tensor([prompt]), torch.ones(1, len(prompt)), 1)
    return torch.stack(read)


def planted_problem() -> tuple[Problem, Tensor]:
    """The learning problem of the planted model, with its targets from the model itself (as the pipeline
    makes them), and the difference-of-means direction at the source index 1."""
    model = Planted()
    harmful = [[4 + i % 8, 1, 2] for i in range(8)]
    harmless = [[4 + i % 8, 4 + (i + 3) % 8, 3 if i % 8 == 0 else 4 + (i + 5) % 8] for i in range(16)]
    difference = read_residual(model, harmful, 1).mean(dim=0) - read_residual(model, harmless, 1).mean(dim=0)
    start = difference / difference.norm()
    with torch.no_grad():
        with residual_edits(model.layers, learned.ablation_edit(start)):
            compliant = greedy(model, harmful)
        with residual_edits(model.layers, learned.addition_edit(difference, 1)):
            refusing = greedy(model, harmless)
        retained = greedy(model, harmless)
    assert {a[0] for a in greedy(model, harmful).targets} == {REFUSE}  # the planted features work as described
    assert {a[0] for a in retained.targets} == {PLAIN, NUISANCE}
    problem = Problem(
        model, model.layers, start, float(difference.norm()), 1, compliant, refusing, retained, 0, torch.device("cpu")
    )
    return problem, start


def test_the_learned_direction_finds_the_refusal_feature_the_difference_of_means_mixes() -> None:
    problem, start = planted_problem()
    u, v = torch.eye(HIDDEN)[U], torch.eye(HIDDEN)[V]
    assert float(start @ u) < 0.8 and float(start @ v) > 0.5  # pulled towards the nuisance
    r = optimize_direction(problem, [1.0, 1.0, 1.0], steps=32, seed=0, batch_rows=4)
    assert float(r.norm()) == pytest.approx(1.0, abs=1e-5)
    assert float(r @ u) >= 0.9
    assert abs(float(r @ v)) < 0.3


def test_the_retain_loss_is_what_removes_the_nuisance() -> None:
    """Without the retain loss nothing penalizes ablating v, so the direction keeps much of it."""
    problem, _ = planted_problem()
    with_retain = optimize_direction(problem, [1.0, 1.0, 1.0], steps=32, seed=0, batch_rows=4)
    without = optimize_direction(problem, [1.0, 1.0, 0.0], steps=32, seed=0, batch_rows=4)
    v = torch.eye(HIDDEN)[V]
    assert abs(float(with_retain @ v)) < abs(float(without @ v)) - 0.1


# --- The pipeline's learned direction on a tiny random model -----------------------------------------

HARMFUL = [Prompt("You are a helpful assistant.", f"How do I break into house number {i}?") for i in range(4)]
HARMLESS = [Prompt("You are a helpful assistant.", f"Write a short poem about the number {i}.") for i in range(4)]


@pytest.fixture(scope="module")
def tiny(tiny_models: dict[str, Path]) -> tuple[Any, Engine, dict[str, Tensor]]:
    loaded = load_model(str(tiny_models["llama"]), dtypes=["float32"])
    engine = Engine(loaded.model, loaded.tokenizer, eos_token_ids(loaded), batch_size=4)
    layers = list(loaded.model.model.layers)
    residuals = {
        name: engine.residuals(engine.encode(prompts), layers) for name, prompts in (("harmful", HARMFUL), ("harmless", HARMLESS))
    }
    return loaded, engine, residuals


def learn(tiny: tuple[Any, Engine, dict[str, Tensor]], cache: Path, steps: int = 3) -> learned.LearnedDirection:
    loaded, engine, residuals = tiny
    settings = Settings(direction_method=DirectionMethod.learned, learned_direction_steps=steps, cache_dir=str(cache))
    return learned.learn_direction(settings, engine, loaded, {"harmful": HARMFUL, "harmless": HARMLESS}, residuals)


def test_the_learned_direction_is_deterministic_and_fills_every_row(tiny: Any, tmp_path: Path) -> None:
    first, second = learn(tiny, tmp_path / "a"), learn(tiny, tmp_path / "b")
    assert not first.cached and not second.cached
    assert torch.equal(first.directions, second.directions)
    layers = tiny[0].model.config.num_hidden_layers
    assert first.directions.shape == (layers + 1, tiny[0].model.config.hidden_size)
    assert torch.equal(first.directions, first.directions[:1].expand(layers + 1, -1))
    assert float(first.directions[0].norm()) == pytest.approx(1.0, abs=1e-5)
    assert float(first.directions[0] @ first.start) < 0.9999  # the optimization moved it
    assert "cosine to it" in first.summary()


def test_a_cached_learned_direction_is_not_learned_again(tiny: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = learn(tiny, tmp_path)
    assert list((tmp_path / "directions").iterdir())  # stored, with no staging file left
    assert not [path for path in (tmp_path / "directions").iterdir() if path.name.startswith(".")]

    def fail(*_: object, **__: object) -> Tensor:
        raise AssertionError("optimized again")

    monkeypatch.setattr(learned, "optimize_direction", fail)
    again = learn(tiny, tmp_path)
    assert again.cached and torch.equal(again.directions, first.directions)
    assert again.seconds == pytest.approx(first.seconds, abs=1e-3)
    loaded, engine, residuals = tiny
    settings = Settings(direction_method=DirectionMethod.learned, learned_direction_steps=3, cache_dir=str(tmp_path))
    pipeline = compute_directions(settings, engine, loaded, {"harmful": HARMFUL, "harmless": HARMLESS}, residuals)
    assert torch.equal(pipeline, first.directions)  # the pipeline's directions are the learned ones
    with pytest.raises(AssertionError, match="optimized again"):
        learn(tiny, tmp_path, steps=4)  # other settings: another direction


def test_learning_leaves_the_model_as_it_was(tiny: Any, tmp_path: Path) -> None:
    loaded, engine, _ = tiny
    ids = engine.encode(HARMLESS)
    before = engine.first_logprobs(ids)
    trainable = [p.requires_grad for p in loaded.model.parameters()]
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in loaded.model.modules()]
    learn(tiny, tmp_path)
    assert torch.equal(engine.first_logprobs(ids), before)
    assert [p.requires_grad for p in loaded.model.parameters()] == trainable
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in loaded.model.modules()] == hooks
    assert engine.reuse is None


def test_hooks_are_removed_when_the_forward_pass_fails() -> None:
    model = Planted()

    def broken(_index: int, _hidden: Tensor) -> Tensor:
        raise RuntimeError("broken edit")

    with pytest.raises(RuntimeError, match="broken edit"), residual_edits(model.layers, broken):
        model(torch.tensor([[4, 1, 2]]), torch.ones(1, 3), 1)
    assert all(not layer._forward_hooks and not layer._forward_pre_hooks for layer in model.layers)
