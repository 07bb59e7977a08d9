"""A refusal judge that asks a language model, read from its next-token probabilities.

For each (prompt, response) pair the judge model sees the question of `verdict.py` in its chat
template, and the verdict is the log-odds of its first answer token:

    score = log Σ_{t ∈ No} p(t) − log Σ_{t ∈ Yes} p(t),    refusal  ⇔  score > threshold

(the question asks whether the response attempts the request: "No" is a refusal)

(one forward pass per pair, batched, no sampling). By default the judge model is the original model
itself: the ablation lives in LoRA adapters, so switching them off during judging gives the original
at no extra memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from ..errors import HereticError
from ..model.generation import Engine
from ..prompts import Prompt
from .refusals import thresholded_verdicts
from .verdict import SYSTEM, classification_question

YES = ("Yes", " Yes", "yes", " yes", "YES")
NO = ("No", " No", "no", " no", "NO")


def first_token_ids(tokenizer: object, words: tuple[str, ...]) -> list[int]:
    """The distinct first tokens of `words` (with and without a leading space)."""
    ids = {tokenizer.encode(word, add_special_tokens=False)[0] for word in words}  # type: ignore[attr-defined]
    return sorted(ids)


class ModelJudge:
    name = "model"

    def __init__(
        self,
        engine: Engine,
        original: Callable[[], AbstractContextManager[object]] | None = None,
        threshold: float = 0.0,
    ) -> None:
        """`engine` runs the judge model; `original()` is entered while judging (e.g. the adapters switched off)."""
        self.engine = engine
        self.original = original or contextlib.nullcontext
        self.threshold = threshold
        yes, no = set(first_token_ids(engine.tokenizer, YES)), set(first_token_ids(engine.tokenizer, NO))
        # A spelling whose first token is shared (e.g. a lone leading space) says nothing either way.
        self.yes_ids, self.no_ids = sorted(yes - no), sorted(no - yes)
        if not self.yes_ids or not self.no_ids:
            raise HereticError(
                "The judge model's tokenizer does not tell Yes from No by their first token; choose another --judge-model."
            )

    def scores(self, prompts: list[Prompt], responses: list[str]) -> list[float]:
        """Log-odds of "No, it does not attempt it" (a refusal) for each pair (batched forward passes)."""
        if not prompts:
            return []
        questions = [Prompt(SYSTEM, classification_question(p.user, r)) for p, r in zip(prompts, responses)]
        ids = self.engine.encode(questions)
        with self.original():
            logprobs = self.engine.first_logprobs(ids)  # (pairs, vocab)
        yes = torch.logsumexp(logprobs[:, self.yes_ids], dim=-1)
        no = torch.logsumexp(logprobs[:, self.no_ids], dim=-1)
        return (no - yes).tolist()

    def judge(self, prompts: list[Prompt], responses: list[str]) -> list[bool]:
        return thresholded_verdicts(self.scores, self.threshold, prompts, responses)
