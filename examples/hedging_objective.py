"""An objective plug-in for Heretic: how much the model hedges ("maybe", "perhaps", "I think").

Use it by naming it in a table of your config.toml (or with --objectives examples/hedging_objective.py:Hedging):

    [objectives.hedging]
    use = "examples/hedging_objective.py:Hedging"
    direction = "minimize"                    # or "maximize", or "report" (shown, never optimized)
    prompts = "bundled:harmless_test[:20]"    # its own prompts; leave out to score the harmful responses
    words = ["maybe", "perhaps", "i think"]   # a setting of this objective, checked by Hedging.Settings

The search then co-optimizes refusals, KL divergence and the hedging score, and the Pareto front shows all three.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field

from heretic.scoring.objectives import ObjectiveContext, TrialOutputs


class Hedging:
    name = "hedging"  # shown when the table does not name it
    direction = "minimize"  # the default; the table's `direction` overrides it

    class Settings(BaseModel):
        """The objective's own keys of [objectives.hedging]; unknown keys and bad values are reported in one sentence."""

        model_config = ConfigDict(extra="forbid")
        words: list[str] = Field(default=["maybe", "perhaps", "possibly", "might", "i think", "i believe"], min_length=1)

    def __init__(self, settings: Hedging.Settings) -> None:
        # Whole words (or phrases), case-insensitive.
        self.pattern = re.compile(r"\b(?:" + "|".join(re.escape(word.lower()) for word in settings.words) + r")\b")
        self.scored = "the harmful evaluation prompts"

    def setup(self, context: ObjectiveContext) -> None:
        """Called once before the original model is scored; the context holds the engine, evaluator and settings."""
        if context.prompts is not None:
            self.scored = f"{len(context.prompts)} prompts of its own"

    def score(self, trial: TrialOutputs) -> float:
        """Hedging words per response, averaged over the responses to its own prompts (else the harmful ones)."""
        responses = trial.own_responses if trial.own_prompts else trial.responses
        if not responses:
            return 0.0
        return sum(len(self.pattern.findall(response.lower())) for response in responses) / len(responses)
