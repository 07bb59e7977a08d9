"""A Heretic objective plug-in: hedging words ("maybe", "perhaps", "I think") per answer.

[objectives.hedging]                      # in config.toml; or --objectives examples/hedging_objective.py:Hedging
use = "examples/hedging_objective.py:Hedging"
direction = "minimize"                    # or "maximize", or "report" (shown, never optimized)
prompts = "bundled:harmless_test[:20]"    # its own prompts; leave out to score the harmful answers
words = ["maybe", "perhaps", "i think"]   # a setting of its own, checked by Hedging.Settings
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field

from heretic.scoring.objectives import ObjectiveContext, TrialOutputs


class Hedging:
    name = "hedging"  # shown when no table names it
    direction = "minimize"  # the default; the table's `direction` overrides it

    class Settings(BaseModel):  # the own keys of [objectives.hedging]; mistakes are one sentence
        model_config = ConfigDict(extra="forbid")
        words: list[str] = Field(default=["maybe", "perhaps", "possibly", "i think"], min_length=1)

    def __init__(self, settings: Hedging.Settings) -> None:
        words = "|".join(re.escape(word.lower()) for word in settings.words)
        self.pattern = re.compile(rf"\b(?:{words})\b")  # whole words or phrases

    def setup(self, context: ObjectiveContext) -> None:
        """Optional, called once: context has the settings, this table, its prompts, the engine, the evaluator."""
        self.own_prompts = context.prompts is not None

    def score(self, trial: TrialOutputs) -> float:
        """Hedging words per answer to its own prompts (else to the harmful evaluation prompts)."""
        responses = trial.own_responses if self.own_prompts else trial.responses
        return sum(len(self.pattern.findall(text.lower())) for text in responses) / max(len(responses), 1)
