"""Scoring a model state: refusals on harmful prompts and KL divergence on harmless prompts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..model.generation import Engine, common_prefix_length
from ..prompts import Prompt
from .kl import kl_divergence, kl_over_tokens, kl_over_tokens_per_prompt, kl_per_prompt
from .refusals import MarkerJudge, RefusalJudge
from .rules import RuleJudge

if TYPE_CHECKING:
    from .objectives import LoadedObjective

# Called with the refusals found so far (a lower bound of the final count): True stops counting.
Cutoff = Callable[[int], bool]
# Called with every prompt, its response and its verdict (True: refusal) once a count is complete.
ResponsesFn = Callable[[list[Prompt], list[str], list[bool]], None]
ProgressFactory = Callable[[str, int], "ProgressHandle"]


class ProgressHandle:
    """What the evaluator reports progress to (a rich task, or nothing)."""

    def advance(self, amount: int) -> None:  # pragma: no cover - interface
        pass

    def close(self) -> None:  # pragma: no cover - interface
        pass


def _no_progress(_description: str, _total: int) -> ProgressHandle:
    return ProgressHandle()


@dataclass
class RefusalCount:
    refusals: int  # exact when complete, else a lower bound
    complete: bool
    responses: list[str] = field(default_factory=list)  # empty when cut short
    verdicts: list[bool] = field(default_factory=list)
    token_counts: list[int] = field(default_factory=list)  # generated tokens per response


class Evaluator:
    def __init__(
        self,
        engine: Engine,
        judge: RefusalJudge,
        harmful: list[Prompt],
        harmless: list[Prompt],
        max_response_length: int,
        stop_on_verdict: bool = True,
        progress: ProgressFactory | None = None,
    ) -> None:
        self.engine = engine
        self.judge = judge
        self.harmful = harmful
        self.harmless = harmless
        self.max_response_length = max_response_length
        self.stop_on_verdict = stop_on_verdict
        self.progress = progress or _no_progress
        self.harmful_ids = engine.encode(harmful)
        self.harmless_ids = engine.encode(harmless)
        self.base_logprobs: torch.Tensor | None = None
        self.kl_tokens = 1  # response tokens the KL divergence reads (> 1: teacher-forced greedy continuations)
        self.kl_ids: list[list[int]] = []  # harmless prompts + the original's continuations (kl_tokens > 1)
        self.kl_counts = torch.ones(0, dtype=torch.long)  # response positions per prompt (continuations end at EOS)
        self.objectives: list[LoadedObjective] = []  # scored after each refusal count (scoring/objectives.py)
        self.stop_on_refusal_only = False  # early stopping only for certain refusals: compliant responses stay whole
        self.on_responses: ResponsesFn | None = None  # e.g. printing them (--print-responses)

    def measure_base(self) -> None:
        """The original model's first-position distributions (computed once, with adapters at zero).
        With kl_tokens N > 1, first its greedy continuations of N - 1 tokens, which every KL then reads
        under teacher forcing (the distributions of the first N response tokens)."""
        if self.kl_tokens > 1:
            continuations = self.engine.generate(self.harmless_ids, self.kl_tokens - 1)
            assert continuations is not None
            self.kl_ids = [ids + tokens for ids, tokens in zip(self.harmless_ids, continuations)]
            self.kl_counts = torch.tensor([len(tokens) + 1 for tokens in continuations])
        self.base_logprobs = self.logprobs()

    def logprobs(self) -> torch.Tensor:
        """(prompts, vocab) first-position log-probabilities; (prompts, N, vocab) with kl_tokens N > 1."""
        handle = self.progress("KL divergence", len(self.harmless_ids))
        try:
            if self.kl_tokens > 1 and self.kl_ids:
                return self.engine.last_logprobs(self.kl_ids, self.kl_tokens, progress=handle.advance)
            return self.engine.first_logprobs(self.harmless_ids, progress=handle.advance)
        finally:
            handle.close()

    def kl(self) -> float:
        assert self.base_logprobs is not None, "measure_base() first"
        if self.base_logprobs.dim() == 3:
            return kl_over_tokens(self.base_logprobs, self.logprobs(), self.kl_counts)
        return kl_divergence(self.base_logprobs, self.logprobs())

    def kl_per_prompt(self) -> torch.Tensor:
        """(prompts,) each harmless prompt's KL divergence from the original, the terms `kl` averages."""
        assert self.base_logprobs is not None, "measure_base() first"
        if self.base_logprobs.dim() == 3:
            return kl_over_tokens_per_prompt(self.base_logprobs, self.logprobs(), self.kl_counts)
        return kl_per_prompt(self.base_logprobs, self.logprobs())

    def count_refusals(self, cutoff: Cutoff | None = None) -> RefusalCount:
        """Greedy responses to the harmful prompts, judged. Stops early once `cutoff` says so.

        With `stop_on_verdict`, a response stops growing once the judge's verdict on it is fixed:
        `verdict_so_far(partial)` (True/False, None while open) or, for judges that only know
        refusals early, `decided(partial)`."""
        early: list[bool | None] = [None] * len(self.harmful_ids)
        found = 0
        verdict_so_far = early_verdict(self.judge) if self.stop_on_verdict else None
        if verdict_so_far is not None and self.stop_on_refusal_only:
            verdict_so_far = refusal_only(verdict_so_far)

        def record(index: int, verdict: bool) -> None:
            nonlocal found
            early[index] = verdict
            found += int(verdict)

        def is_decided(index: int, tokens: list[int]) -> bool:
            assert verdict_so_far is not None
            verdict = verdict_so_far(self.engine.decode(tokens))
            if verdict is None:
                return False
            record(index, verdict)
            return True

        def judge_finished(index: int, tokens: list[int]) -> None:
            """A whole response, judged as it ends: the count the cut-off sees grows during generation."""
            record(index, bool(self.judge.judge([self.harmful[index]], [self.engine.decode(tokens)])[0]))

        # Judging one response at a time costs nothing for the rule-based judges (and equals judging all at the end).
        cheap = isinstance(self.judge, (MarkerJudge, RuleJudge)) and verdict_so_far is not None and cutoff is not None
        handle = self.progress("Refusals", len(self.harmful_ids) * self.max_response_length)
        try:
            token_ids = self.engine.generate(
                self.harmful_ids,
                self.max_response_length,
                is_decided=is_decided if verdict_so_far is not None else None,
                should_abort=(lambda: cutoff(found)) if cutoff is not None else None,
                progress=handle.advance,
                on_finished=judge_finished if cheap else None,
            )
        finally:
            handle.close()
        if token_ids is None:
            return RefusalCount(found, complete=False)
        responses = [self.engine.decode(tokens) for tokens in token_ids]
        undecided = [i for i, verdict in enumerate(early) if verdict is None]
        judged = self.judge.judge([self.harmful[i] for i in undecided], [responses[i] for i in undecided])
        verdicts = [bool(verdict) for verdict in early]
        for index, verdict in zip(undecided, judged):
            verdicts[index] = bool(verdict)
        counts = [len(tokens) for tokens in token_ids]
        if self.on_responses is not None:
            self.on_responses(self.harmful, responses, verdicts)
        return RefusalCount(sum(verdicts), complete=True, responses=responses, verdicts=verdicts, token_counts=counts)

    def responses(self, prompts: list[Prompt], max_new_tokens: int | None = None) -> list[str]:
        """Full greedy responses (no early stop), for showing before/after examples."""
        ids = self.engine.encode(prompts)
        token_ids = self.engine.generate(ids, max_new_tokens or self.max_response_length)
        assert token_ids is not None
        return [self.engine.decode(tokens) for tokens in token_ids]


def early_verdict(judge: RefusalJudge) -> Callable[[str], bool | None] | None:
    """The judge's verdict on a partial response, where it can give one: its `verdict_so_far`, or its
    `decided` (a refusal as soon as it is certain, never an early compliance); None if it has neither."""
    verdict_so_far = getattr(judge, "verdict_so_far", None)
    if callable(verdict_so_far):
        return verdict_so_far  # type: ignore[no-any-return]
    decided = getattr(judge, "decided", None)
    if callable(decided):
        return lambda partial: True if decided(partial) else None
    return None


def refusal_only(verdict_so_far: Callable[[str], bool | None]) -> Callable[[str], bool | None]:
    """An early verdict that only ever says "refusal": a response that complies is generated in full."""
    return lambda partial: True if verdict_so_far(partial) is True else None


# The shortest common opening that is prefilled (characters, without surrounding whitespace).
MIN_COMMON_OPENING = 12


def detect_response_prefix(
    engine: Engine,
    prompts: list[Prompt],
    tags: list[tuple[str, str]],
    probe_tokens: int = 24,
    common_opening: bool = False,
) -> str:
    """The text to prefill at the start of every response, from short greedy responses to `prompts`.

    If the responses open a chain-of-thought block (one of `tags`), the closed empty block; else, with
    `common_opening`, the text they all open with (see `shared_opening`); else nothing."""
    if not prompts or not (tags or common_opening):
        return ""
    saved, engine.response_prefix = engine.response_prefix, ""
    try:
        ids = engine.encode(prompts)
        token_ids = engine.generate(ids, probe_tokens)
    finally:
        engine.response_prefix = saved
    assert token_ids is not None
    texts = [str(engine.tokenizer.decode(tokens, skip_special_tokens=False)) for tokens in token_ids]
    stripped = texts[0][: common_prefix_length(texts)].lstrip()
    for opening, closing in tags:
        if stripped.startswith(opening):
            if opening.endswith("|>"):
                return opening + closing
            return f"{opening}\n\n{closing}\n\n"
    if common_opening:
        return shared_opening(texts, list(engine.tokenizer.all_special_tokens))
    return ""


def shared_opening(texts: list[str], special_tokens: list[str], min_chars: int = MIN_COMMON_OPENING) -> str:
    """The text all `texts` open with, cut before any special token and at a word boundary (never
    inside a word, no trailing spaces); "" when it is shorter than `min_chars` (without surrounding
    whitespace) or when the texts do not differ after it (a model that ignores its prompt)."""
    if len(texts) < 2 or len(set(texts)) < 2:
        return ""
    prefix = texts[0][: common_prefix_length(texts)]
    for token in special_tokens:
        if token and token in prefix:
            prefix = prefix[: prefix.index(token)]
    inside_word = any(len(text) > len(prefix) and text[len(prefix)].isalnum() for text in texts)
    if prefix and prefix[-1].isalnum() and inside_word:
        boundary = max((i for i, char in enumerate(prefix) if not char.isalnum()), default=-1)
        prefix = prefix[: boundary + 1]
    prefix = prefix.rstrip(" \t")
    return prefix if len(prefix.strip()) >= min_chars else ""
