"""`heretic --model A --evaluate-model B`: refusals and KL divergence of B measured against A (and the further
objectives of --objectives, for both)."""

from __future__ import annotations

import gc

import torch
from rich.table import Table

from .config import Settings
from .model.hardware import dtype_name
from .scoring.evaluator import Evaluator
from .scoring.objectives import load_objectives, score_objectives, setup_objectives
from .search.pareto import objective_text
from .session import choose_response_prefix, keep_whole, load, load_prompt_sets, make_engine, make_judge
from .ui import ProgressBars, console, print_responses

# The batch size of both models when --batch-size is 0 (no measurement here).
EVALUATION_BATCH_SIZE = 16


def evaluate_model(settings: Settings) -> list[tuple[str, str, int, float]]:
    """Print and return (role, model, refusals, KL) for the original and the evaluated model."""
    objectives = load_objectives(settings)  # first: a mistake in a table is reported before any model loads
    prompt_sets = load_prompt_sets(settings)
    harmful, harmless = prompt_sets["harmful_eval"], prompt_sets["harmless_eval"]
    judge = make_judge(settings)
    rows, values = [], []
    # The original's distributions, prompts (with --kl-tokens N > 1, its continuations) and positions read.
    reference: tuple[torch.Tensor, list[list[int]], torch.Tensor] | None = None
    prefix: str | None = None
    for role, name in (("original", settings.model), ("evaluated", settings.evaluate_model)):
        loaded = load(settings, name)
        # Both models compute in the same dtype: a KL between dtypes would measure rounding too.
        settings = settings.model_copy(update={"dtypes": [dtype_name(loaded.dtype)]})
        engine = make_engine(settings, loaded, settings.batch_size or EVALUATION_BATCH_SIZE)
        if prefix is None:  # the original's: both models are judged from the same point
            prefix = choose_response_prefix(settings, engine, prompt_sets)
        engine.response_prefix = prefix
        with ProgressBars() as bars:
            evaluator = Evaluator(engine, judge, harmful, harmless, settings.max_response_length, settings.stop_on_verdict, bars)
            evaluator.kl_tokens = settings.kl_tokens
            if settings.print_responses:
                evaluator.on_responses = print_responses
            keep_whole(evaluator, objectives)
            if reference is None:
                evaluator.measure_base()  # with --kl-tokens N > 1: the original's continuations, read by both
                kl = 0.0
            else:
                # The evaluated model's distributions over the original's prompts and continuations.
                evaluator.base_logprobs, evaluator.kl_ids, evaluator.kl_counts = reference
                kl = evaluator.kl()
            count = evaluator.count_refusals()
            refusals = count.refusals
            setup_objectives(objectives, settings, evaluator)
        values.append(score_objectives(objectives, evaluator, count, kl))
        rows.append((role, str(name), refusals, kl))
        if reference is None:
            assert evaluator.base_logprobs is not None
            reference = (evaluator.base_logprobs, evaluator.kl_ids, evaluator.kl_counts)
        del engine, evaluator, loaded
        gc.collect()
    table = Table(title="Evaluation", title_justify="left")
    table.add_column("model")
    table.add_column(f"refusals (harmful, /{len(harmful)}; judge: {getattr(judge, 'name', settings.judge)})", justify="right")
    over = f", first {settings.kl_tokens} tokens" if settings.kl_tokens > 1 else ""
    table.add_column(f"KL from original (harmless, {len(harmless)}{over})", justify="right")
    for objective in objectives:
        table.add_column(f"{objective.name} ({objective.direction})", justify="right")
    for (role, name, refusals, kl), scores in zip(rows, values):
        table.add_row(f"{name} ({role})", str(refusals), f"{kl:.4g}", *(objective_text(v) for v in scores.values()))
    console.print(table)
    return rows
