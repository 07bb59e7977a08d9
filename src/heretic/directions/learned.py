"""Learned refusal directions (refusal direction optimization, Wollschläger et al., "The Geometry of
Refusal in Large Language Models", ICML 2025).

A single unit direction r is optimized by gradient, the model frozen, starting from the difference of
means d at a source residual index l (0: the first layer's input, i + 1: layer i's output). l is the index in
--direction-index-range (where the search draws its global direction) at which the harmful and harmless
residuals are best separated along d, in standard deviations (`source_index`): there d is the most reliable
start, and adding it makes refusals. Three losses:

- ablation: L_abl = CE(compliant targets | harmful prompts, r ablated), where "r ablated" means
  h <- h - (h . r) r at every residual index and position (the first layer's input and every layer's output);
- addition: L_add = CE(refusal targets | harmless prompts, alpha r added at index l), alpha = |mean_harmful_l -
  mean_harmless_l| (the norm of the mean difference there);
- retain: L_ret = KL(p_original || p_ablated), the next-token distributions on harmless prompts over the
  positions of the original model's own answers to them;

L = w_abl L_abl + w_add L_add + w_ret L_ret (the weights of --learned-direction-weights), CE and KL averaged
over the target tokens. Adam steps on r (learning rate STEP_ANGLE / sqrt(hidden)), each followed by r <- r / |r|.

The targets come from the model itself: compliant targets are the greedy answers to harmful training prompts
of the model with d ablated, refusal targets the greedy answers to harmless training prompts with alpha d
added at l, and the retain reference the original's logits on the harmless prompts followed by its own answers.

The pipeline's directions have one row per residual index (layers + 1, hidden) and the search picks a
(fractional) row; the learned r is put in every row, so that the global index and the per-layer directions
both ablate it (the search then chooses where to ablate, not what).

A learned direction is computed once per model, prompt sets, the settings that change it and --seed, and kept
in --cache-dir (the study stores it too, so a resumed or joined search does not compute it again).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import Settings
from ..model.architecture import find_layers, text_config
from ..model.generation import Engine
from ..model.hardware import dtype_name
from ..model.loading import LoadedModel
from ..prompts import Prompt, prompts_digest
from . import refusal_directions

log = logging.getLogger(__name__)

# Training prompts of each set used (their first ones), tokens of each target answer and rows per batch:
# sized so that the one-off cost stays about a minute for a 0.5B model on two CPU cores.
PROMPTS_PER_SET = 4
TARGET_TOKENS = 16
BATCH_ROWS = 2
# About how far (radians) one Adam step turns r: Adam's first steps move every component by about its learning
# rate, so the learning rate is STEP_ANGLE / sqrt(hidden), the same turn for every width.
STEP_ANGLE = 0.12

# edit(residual index, hidden states (rows, positions, hidden)) -> the edited hidden states.
EditFn = Callable[[int, Tensor], Tensor]


@dataclass
class Examples:
    """Prompts followed by target answers (token ids; the answers without end-of-text)."""

    prompts: list[list[int]]
    targets: list[list[int]]


@dataclass
class LearnedDirection:
    directions: Tensor  # (layers + 1, hidden): the learned direction in every row
    start: Tensor  # (hidden,) the difference-of-means direction it started from
    source: int  # the residual index it started from (and where it is added)
    seconds: float  # what learning it cost (when it was learned, also for a cached one)
    steps: int
    cached: bool = False

    def summary(self) -> str:
        cosine = float(self.directions[0].double() @ self.start.double())
        origin = "taken from the cache" if self.cached else "learned"
        return (
            f"Refusal direction {origin}: {self.steps} steps in {self.seconds:.1f} s (once per model and prompts), "
            f"started from the difference of means at residual index {self.source}, cosine to it {cosine:.3f}"
        )


# --- Pure math --------------------------------------------------------------------------------------


def ablate(hidden: Tensor, r: Tensor) -> Tensor:
    """h - (h . r) r for unit r (hidden,), hidden (..., hidden); computed in the hidden states' dtype."""
    r = r.to(hidden.dtype)
    return hidden - (hidden @ r).unsqueeze(-1) * r


def source_index(harmful: Tensor, harmless: Tensor, index_range: Sequence[float]) -> int:
    """The residual index in `index_range` (fractions of the last index) where the harmful and harmless
    residuals are best separated along their mean difference d_j = normalize(mean_harmful_j - mean_harmless_j):
    argmax_j (mean_harmful_j . d_j - mean_harmless_j . d_j) / std_j, std_j the pooled standard deviation of
    all projections onto d_j (a separation in standard deviations, comparable across depths where norms grow).
    harmful: (n1, layers + 1, hidden), harmless: (n2, layers + 1, hidden)."""
    last = harmful.shape[1] - 1
    low, high = round(index_range[0] * last), round(index_range[1] * last)
    difference = harmful.double().mean(dim=0) - harmless.double().mean(dim=0)  # (layers + 1, hidden)
    unit = difference / difference.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    projections = torch.einsum("nlh,lh->nl", torch.cat([harmful, harmless]).double(), unit)  # (n1 + n2, layers + 1)
    pooled = projections.std(dim=0).clamp_min(1e-12)  # (layers + 1,)
    separation = difference.norm(dim=-1) / pooled
    return low + int(separation[low : high + 1].argmax())


def target_cross_entropy(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """Mean over the masked positions of -log softmax(logits)[label]. logits (rows, T, vocab), labels and mask (rows, T)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    picked = logprobs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (rows, T)
    return -(picked * mask).sum() / mask.sum().clamp_min(1)


def kl_divergence(reference: Tensor, logits: Tensor, mask: Tensor) -> Tensor:
    """Mean over the masked positions of KL(p || q) = sum_v p_v (log p_v - log q_v), reference = log p
    (rows, T, vocab), q = softmax(logits)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    per_position = (reference.exp() * (reference - logprobs)).sum(dim=-1)  # (rows, T)
    return (per_position * mask).sum() / mask.sum().clamp_min(1)


# --- Forward passes with the residual stream edited --------------------------------------------------


@contextlib.contextmanager
def residual_edits(layers: Sequence[torch.nn.Module], edit: EditFn) -> Iterator[None]:
    """Apply `edit` to the residual stream at every index (0: the first layer's input, i + 1: layer i's
    output) while the context lasts; the hooks are removed afterwards, whatever happens."""

    def edit_input(
        _module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if args:
            return (edit(0, args[0]), *args[1:]), kwargs
        return args, dict(kwargs, hidden_states=edit(0, kwargs["hidden_states"]))

    def edit_output(index: int) -> Callable[[torch.nn.Module, tuple[Any, ...], object], object]:
        def hook(_module: torch.nn.Module, _args: tuple[Any, ...], output: object) -> object:
            if isinstance(output, (tuple, list)):
                return (edit(index, output[0]), *output[1:])
            return edit(index, output)  # type: ignore[arg-type]

        return hook

    handles = [layers[0].register_forward_pre_hook(edit_input, with_kwargs=True)]
    try:
        handles += [layer.register_forward_hook(edit_output(i + 1)) for i, layer in enumerate(layers)]
        yield
    finally:
        for handle in handles:
            handle.remove()


def ablation_edit(r: Tensor) -> EditFn:
    return lambda _index, hidden: ablate(hidden, r)


def addition_edit(vector: Tensor, source: int) -> EditFn:
    """h + vector at residual index `source` (every position), unchanged elsewhere."""
    return lambda index, hidden: hidden + vector.to(hidden.dtype) if index == source else hidden


def teacher_forced(
    model: torch.nn.Module, examples: Examples, rows: list[int], pad_id: int, device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """(logits (rows, T, vocab) predicting each target token, labels (rows, T), mask (rows, T)) of the
    prompts followed by their targets, left-padded so that all end together; T = the longest target."""
    sequences = [examples.prompts[i] + examples.targets[i] for i in rows]
    width, longest = max(map(len, sequences)), max(len(examples.targets[i]) for i in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), longest))
    for row, (i, sequence) in enumerate(zip(rows, sequences)):
        input_ids[row, width - len(sequence) :] = torch.tensor(sequence)
        attention[row, width - len(sequence) :] = 1
        mask[row, longest - len(examples.targets[i]) :] = 1
    positions = (attention.cumsum(dim=1) - 1).clamp(min=0)
    output = model(
        input_ids=input_ids.to(device),
        attention_mask=attention.to(device),
        position_ids=positions.to(device),
        logits_to_keep=longest + 1,
        use_cache=False,
    )
    logits = output.logits[:, :-1, :]  # position p predicts token p + 1: the last one predicts nothing
    return logits, input_ids[:, width - longest :].to(device), mask.to(device)


# --- Optimization ------------------------------------------------------------------------------------


@dataclass
class Problem:
    """What the optimization of one direction needs (the model is not changed)."""

    model: torch.nn.Module
    layers: Sequence[torch.nn.Module]
    start: Tensor  # (hidden,) unit
    alpha: float
    source: int
    compliant: Examples  # harmful prompts and compliant answers (ablation loss)
    refusing: Examples  # harmless prompts and refusals (addition loss)
    retained: Examples  # harmless prompts and the original's answers (retain loss)
    pad_id: int
    device: torch.device


def fixed_batches(count: int, size: int, generator: torch.Generator) -> list[list[int]]:
    """The indices 0..count-1 in a seeded order, cut into batches of `size` (the last may be shorter)."""
    order = torch.randperm(count, generator=generator).tolist()
    return [order[start : start + size] for start in range(0, count, size)]


def optimize_direction(
    problem: Problem,
    weights: Sequence[float],
    steps: int,
    seed: int,
    batch_rows: int = BATCH_ROWS,
    step_angle: float = STEP_ANGLE,
) -> Tensor:
    """The learned unit direction (hidden,), float32: `steps` Adam steps on L = w_abl L_abl + w_add L_add +
    w_ret L_ret (see the module's docstring), each on the next of a few fixed, seeded batches of every set.
    The model's parameters are frozen during the optimization and their `requires_grad` restored after."""
    generator = torch.Generator().manual_seed(seed)
    batches = {
        name: fixed_batches(len(getattr(problem, name).prompts), batch_rows, generator)
        for name in ("compliant", "refusing", "retained")
    }
    reference = []
    with torch.no_grad():
        for rows in batches["retained"]:
            logits, _, _ = teacher_forced(problem.model, problem.retained, rows, problem.pad_id, problem.device)
            reference.append(torch.log_softmax(logits.float(), dim=-1))  # (rows, T, vocab)
    r = problem.start.detach().clone().float().to(problem.device).requires_grad_(True)
    optimizer = torch.optim.Adam([r], lr=step_angle / r.numel() ** 0.5)
    parameters = list(problem.model.parameters())
    trainable = [p.requires_grad for p in parameters]
    try:
        for p in parameters:
            p.requires_grad_(False)
        for step in range(steps):
            loss = step_loss(problem, r, weights, batches, reference, step)
            if not loss.requires_grad:  # every loss has weight 0 or no examples: r stays where it started
                break
            (r.grad,) = torch.autograd.grad(loss, [r])
            optimizer.step()
            with torch.no_grad():
                r /= r.norm().clamp_min(1e-12)
    finally:
        for p, flag in zip(parameters, trainable):
            p.requires_grad_(flag)
    return r.detach().cpu()


def step_loss(
    problem: Problem, r: Tensor, weights: Sequence[float], batches: dict[str, list[list[int]]], reference: list[Tensor], step: int
) -> Tensor:
    """w_abl L_abl + w_add L_add + w_ret L_ret on the batches of step `step` (losses of weight 0 or without
    examples are left out)."""
    model, layers, pad, device = problem.model, problem.layers, problem.pad_id, problem.device
    loss = torch.zeros((), device=device)
    if weights[0] and batches["compliant"]:
        rows = batches["compliant"][step % len(batches["compliant"])]
        with residual_edits(layers, ablation_edit(r)):
            loss = loss + weights[0] * target_cross_entropy(*teacher_forced(model, problem.compliant, rows, pad, device))
    if weights[1] and batches["refusing"]:
        rows = batches["refusing"][step % len(batches["refusing"])]
        with residual_edits(layers, addition_edit(problem.alpha * r, problem.source)):
            loss = loss + weights[1] * target_cross_entropy(*teacher_forced(model, problem.refusing, rows, pad, device))
    if weights[2] and batches["retained"]:
        index = step % len(batches["retained"])
        with residual_edits(layers, ablation_edit(r)):
            logits, _, mask = teacher_forced(model, problem.retained, batches["retained"][index], pad, device)
        loss = loss + weights[2] * kl_divergence(reference[index], logits, mask)
    return loss


# --- The pipeline's learned direction ----------------------------------------------------------------


def learn_direction(
    settings: Settings, engine: Engine, loaded: LoadedModel, prompt_sets: dict[str, list[Prompt]], residuals: dict[str, Tensor]
) -> LearnedDirection:
    """The learned direction of this model, its training prompts and settings: from the cache in --cache-dir,
    else learned (see the module's docstring) and stored there. residuals: {"harmful": (n1, layers + 1, hidden),
    "harmless": (n2, layers + 1, hidden)}, as `collect_residuals` reads them."""
    harmful, harmless = residuals["harmful"], residuals["harmless"]
    source = source_index(harmful, harmless, settings.direction_index_range)
    start = refusal_directions(harmful, harmless, settings.orthogonalize_direction)[source]  # (hidden,)
    path = cache_path(settings, loaded, engine.response_prefix, prompt_sets)
    cached = read_cached(path)
    if cached is not None:
        directions, seconds = cached
        return LearnedDirection(directions, start, source, seconds, settings.learned_direction_steps, cached=True)
    started = time.perf_counter()
    alpha = float((harmful[:, source].double().mean(dim=0) - harmless[:, source].double().mean(dim=0)).norm())
    _, layers = find_layers(loaded.model, int(text_config(loaded.model.config).num_hidden_layers))
    problem = self_targets(engine, list(layers), prompt_sets, start, alpha, source)
    r = optimize_direction(problem, settings.learned_direction_weights, settings.learned_direction_steps, settings.seed)
    seconds = time.perf_counter() - started
    directions = r.expand(harmful.shape[1], -1).contiguous()  # (layers + 1, hidden)
    write_cached(path, directions, seconds)
    return LearnedDirection(directions, start, source, seconds, settings.learned_direction_steps)


def self_targets(
    engine: Engine, layers: list[torch.nn.Module], prompt_sets: dict[str, list[Prompt]], start: Tensor, alpha: float, source: int
) -> Problem:
    """The optimization problem with the model's own greedy answers (TARGET_TOKENS long at most) as targets:
    to the first harmful training prompts with `start` ablated, to the first harmless ones with alpha * start
    added at `source`, and to the harmless ones unchanged."""
    harmful = engine.encode(prompt_sets["harmful"][:PROMPTS_PER_SET])
    harmless = engine.encode(prompt_sets["harmless"][:PROMPTS_PER_SET])
    reuse, engine.reuse = engine.reuse, None  # every layer must run: the hooks edit each one's output
    try:
        with residual_edits(layers, ablation_edit(start)):
            compliant = answered(engine, harmful)
        with residual_edits(layers, addition_edit(alpha * start, source)):
            refusing = answered(engine, harmless)
        retained = answered(engine, harmless)
    finally:
        engine.reuse = reuse
    return Problem(engine.model, layers, start, alpha, source, compliant, refusing, retained, engine.pad_id, engine.device)


def answered(engine: Engine, prompts: list[list[int]]) -> Examples:
    """The prompts with the model's greedy answers (as the model is now), those with an empty answer left out."""
    answers = engine.generate(prompts, TARGET_TOKENS)
    assert answers is not None  # no abort function was given
    kept = [i for i, answer in enumerate(answers) if answer]
    return Examples([prompts[i] for i in kept], [answers[i] for i in kept])


def cache_path(settings: Settings, loaded: LoadedModel, response_prefix: str, prompt_sets: dict[str, list[Prompt]]) -> Path:
    """Where the learned direction of this model, these training prompts and settings is kept."""
    source = loaded.source
    values = {
        "model": [source.kind, source.path, str(source.gguf_file or ""), dtype_name(loaded.dtype), loaded.quantization],
        "prompts": [prompts_digest(prompt_sets[name][:PROMPTS_PER_SET]) for name in ("harmful", "harmless")],
        "residual_prompts": [prompts_digest(prompt_sets[name]) for name in ("harmful", "harmless")],
        "response_prefix": response_prefix,
        "settings": [
            settings.learned_direction_weights,
            settings.learned_direction_steps,
            settings.direction_positions,
            settings.winsorization_quantile,
            settings.orthogonalize_direction,
            settings.direction_index_range,
            settings.seed,
        ],
        "sizes": [PROMPTS_PER_SET, TARGET_TOKENS, BATCH_ROWS, STEP_ANGLE],
    }
    digest = hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()
    return Path(settings.cache_dir).expanduser() / "directions" / f"learned-{digest[:24]}.safetensors"


def read_cached(path: Path) -> tuple[Tensor, float] | None:
    """(directions, seconds their learning cost) stored at `path`, or None (none there, or unreadable)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as stored:
            seconds = float((stored.metadata() or {}).get("seconds", "0"))
            return stored.get_tensor("directions"), seconds
    except (OSError, ValueError, KeyError, RuntimeError):
        return None


def write_cached(path: Path, directions: Tensor, seconds: float) -> None:
    """Store the directions at `path` atomically (a failed write only costs learning them again next time)."""
    from safetensors.torch import save_file

    staging = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"directions": directions.contiguous()}, str(staging), metadata={"seconds": f"{seconds:.3f}"})
        os.replace(staging, path)
    except OSError as error:
        staging.unlink(missing_ok=True)
        log.info("Could not store the learned direction in %s: %s", path, error)
