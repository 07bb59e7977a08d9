"""Objectives besides refusals and KL: plug-ins that score each trial, minimized, maximized or only reported.

An objective is any object with a `name`, a default `direction` and a `score` method:

    class MyObjective:
        name = "my-objective"                  # its name when --objectives gives it as module:Name (a table's name wins)
        direction = "minimize"                  # or "maximize", or "report" (shown, never optimized)
        full_responses = True                   # optional: it needs whole responses to the harmful prompts (early
                                                # stopping goes off); "compliant": whole ones that are not refusals
        default_prompts = PromptSet(...)        # optional: its own prompts when its table names none

        class Settings(pydantic.BaseModel):     # optional: validates the own keys of [objectives.NAME]
            weight: float = 1.0

        def __init__(self, settings): ...       # optional argument: the validated Settings (or the dict of keys)
        def setup(self, context): ...           # optional: once per scored model, before its first score
        def fingerprint(self, settings): ...    # optional: what else its scores depend on among the settings
                                                # (e.g. --benchmark-tasks), for the checkpoint fingerprint
        def score(self, trial) -> float: ...    # once per trial (and once for the original model)

`trial` is a `TrialOutputs`: the harmful evaluation prompts and their responses (already generated for
the refusal count: free), their refusal verdicts and generated token counts, the trial's refusals and KL,
and the responses to the objective's own prompts when its table (or its `default_prompts`) names some (one more
generation per trial).
`context` is an `ObjectiveContext`: the settings, the objective's table, its prompts, the engine and evaluator.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ..config import ObjectiveTable, Settings
from ..model.generation import Engine
from ..prompts import Prompt
from .evaluator import Evaluator
from .refusals import normalize_response

DIRECTIONS = ("minimize", "maximize", "report")


@dataclass
class TrialOutputs:
    """What an objective scores: one trial's (or the original model's) outputs."""

    prompts: list[Prompt]  # the harmful evaluation prompts
    responses: list[str]  # their greedy responses
    verdicts: list[bool]  # True: refusal
    token_counts: list[int]  # generated tokens per response
    refusals: int
    kl: float
    own_prompts: list[Prompt] = field(default_factory=list)  # the objective's own prompts (its table's `prompts`)
    own_responses: list[str] = field(default_factory=list)


@dataclass
class ObjectiveContext:
    """What an objective's `setup` receives."""

    name: str
    settings: Settings
    table: ObjectiveTable
    options: Any  # the validated own settings (an instance of the objective's Settings model, else a dict)
    prompts: list[Prompt] | None
    engine: Engine
    evaluator: Evaluator


@runtime_checkable
class Objective(Protocol):
    name: str  # shown when --objectives names it by its spec (a table's name wins)
    direction: str

    def score(self, trial: TrialOutputs) -> float: ...


def contains_any(text: str, phrases: list[str]) -> bool:
    """Whether the normalized text contains one of the (normalized) phrases."""
    normalized = normalize_response(text)
    return any(phrase in normalized for phrase in phrases)
