"""Refusal judges, early verdicts, pluggable scorers, chain-of-thought prefill, the evaluator."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from heretic.config import DEFAULT_REFUSAL_MARKERS, DEFAULT_THINKING_TAGS
from heretic.errors import HereticError
from heretic.model.generation import Engine
from heretic.model.loading import eos_token_ids, load_model
from heretic.prompts import Prompt
from heretic.scoring.evaluator import Evaluator, detect_response_prefix
from heretic.scoring.refusals import MarkerJudge, load_judge, normalize_response
from heretic.scoring.rules import RuleJudge

JUDGE = MarkerJudge(DEFAULT_REFUSAL_MARKERS)


def test_normalization() -> None:
    assert normalize_response("  I *can\u2019t*\n\n help   THAT ") == "i can't help that"


@pytest.mark.parametrize(
    "response",
    [
        "I'm sorry, but I can't help with that.",
        "I **cannot** provide instructions for that.",
        "As an AI language model, I must decline.",
        "I won\u2019t do that.",
        "",
        "   \n ",
        "Lo siento, no puedo ayudar con eso.",
        "Je suis désolé, je ne peux pas faire cela.",
        "Es tut mir leid, aber das kann ich nicht.",
        "抱歉，我不能帮助你。",
        "申し訳ありませんが、お手伝いできません。",
        "Извините, я не могу помочь с этим.",
        "죄송하지만 도와드릴 수 없습니다.",
        "عذراً، لا أستطيع المساعدة في ذلك.",
        "मुझे क्षमा करें, मैं मदद नहीं कर सकता।",
        "Desculpe, não posso ajudar com isso.",
    ],
)
def test_refusals_are_detected(response: str) -> None:
    assert JUDGE.is_refusal(response)


@pytest.mark.parametrize(
    "response",
    [
        "Sure! Here is a short poem about the sea.",
        "Step 1: preheat the oven. Step 2: mix the flour.",
        "Lock picking is illegal in some places; here is how pin tumbler locks work.",  # 'illegal' is no marker
        "The harmful effects of UV light include sunburn.",
    ],
)
def test_compliant_answers_are_not_refusals(response: str) -> None:
    assert not JUDGE.is_refusal(response)


def test_early_verdict_agrees_with_the_full_verdict() -> None:
    responses = [
        "I'm sorry, but I can't help with that request at all.",
        "Sure, here is what you asked for, step by step.",
        "Here you go. Sorry for the delay!",
        "I *can't* do that",
    ]
    for response in responses:
        decided_at = next((n for n in range(1, len(response) + 1) if JUDGE.decided(response[:n])), None)
        if decided_at is not None:  # once decided, every longer prefix is a refusal
            assert all(JUDGE.is_refusal(response[:n]) for n in range(decided_at, len(response) + 1))
        assert (decided_at is not None) == JUDGE.is_refusal(response)


def test_scorer_from_file_and_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "judge_file.py").write_text(
        "class ShortIsRefusal:\n"
        "    name = 'short'\n"
        "    def __init__(self, settings):\n"
        "        self.limit = 5\n"
        "    def judge(self, prompts, responses):\n"
        "        return [len(r) < self.limit for r in responses]\n"
    )
    judge = load_judge(f"{tmp_path / 'judge_file.py'}:ShortIsRefusal", settings=None)
    assert judge.judge([Prompt("", "x")] * 2, ["no", "a long answer"]) == [True, False]
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "judge_module.py").write_text(
        "def make():\n"
        "    class Judge:\n"
        "        def judge(self, prompts, responses):\n"
        "            return ['nope' in r for r in responses]\n"
        "    return Judge()\n"
    )
    judge = load_judge("judge_module:make", settings=None)
    assert judge.judge([Prompt("", "x")], ["nope"]) == [True] and judge.name == "make"


def test_scorer_errors(tmp_path: Path) -> None:
    with pytest.raises(HereticError, match="Unknown judge 'no-colon'"):
        load_judge("no-colon", None)
    with pytest.raises(HereticError, match="does not exist"):
        load_judge(f"{tmp_path / 'missing.py'}:X", None)
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom')\n")
    with pytest.raises(HereticError, match="boom"):
        load_judge(f"{tmp_path / 'broken.py'}:X", None)
    (tmp_path / "nojudge.py").write_text("class X:\n    pass\n")
    with pytest.raises(HereticError, match="has no method judge"):
        load_judge(f"{tmp_path / 'nojudge.py'}:X", None)
    with pytest.raises(HereticError, match="Cannot import"):
        load_judge("no_such_module_anywhere:X", None)


def _engine(tiny_models: dict[str, Path], kind: str = "llama") -> Engine:
    loaded = load_model(str(tiny_models[kind]), dtypes=["float32"])
    return Engine(loaded.model, loaded.tokenizer, eos_token_ids(loaded), batch_size=4)


PROMPTS = [Prompt("You are a helpful assistant.", f"Question number {i}: why?") for i in range(6)]


def test_early_stopping_gives_the_same_verdicts_as_full_responses(tiny_models: dict[str, Path]) -> None:
    engine = _engine(tiny_models)
    full = [engine.decode(tokens) for tokens in engine.generate(engine.encode(PROMPTS), 16)]
    # Markers taken from the responses themselves, so that some responses are refusals mid-way.
    markers = sorted({response[4:7] for response in full[:3] if len(response) > 8}) or ["zzzz"]
    judge = MarkerJudge(markers)
    expected = judge.judge(PROMPTS, full)
    assert any(expected)
    stopping = Evaluator(engine, judge, PROMPTS, PROMPTS, 16, stop_on_verdict=True).count_refusals()
    plain = Evaluator(engine, judge, PROMPTS, PROMPTS, 16, stop_on_verdict=False).count_refusals()
    assert stopping.verdicts == plain.verdicts == expected
    assert stopping.refusals == sum(expected)


def test_cutoff_stops_counting_with_a_lower_bound(tiny_models: dict[str, Path]) -> None:
    engine = _engine(tiny_models)
    evaluator = Evaluator(engine, MarkerJudge(["a"]), PROMPTS, PROMPTS, 16)
    count = evaluator.count_refusals(cutoff=lambda found: found >= 2)
    assert not count.complete and count.refusals >= 2 and count.responses == []


class RefusesWhatIsWhole(RuleJudge):
    """The rules judge's early verdict (none before 300 characters), calling every whole response a refusal."""

    def judge(self, prompts: list[Prompt], responses: list[str]) -> list[bool]:
        return [True for _ in responses]


def test_the_cutoff_counts_responses_as_they_end(tiny_models: dict[str, Path]) -> None:
    """Responses too short for an early verdict are judged as they end, so a hopeless trial is cut during
    generation, not after it; the verdicts of a count that completes are those of judging at the end."""
    engine = _engine(tiny_models)
    seen: list[int] = []
    count = Evaluator(engine, RefusesWhatIsWhole(), PROMPTS, PROMPTS, 8).count_refusals(cutoff=lambda f: seen.append(f) or False)
    assert count.complete and count.refusals == len(PROMPTS)
    assert seen[-1] == len(PROMPTS)  # the cut-off saw every refusal before generation ended
    cut = Evaluator(engine, RefusesWhatIsWhole(), PROMPTS, PROMPTS, 8).count_refusals(cutoff=lambda found: found >= 2)
    assert not cut.complete and cut.refusals >= 2
    judge = RuleJudge()
    with_cutoff = Evaluator(engine, judge, PROMPTS, PROMPTS, 8).count_refusals(cutoff=lambda found: False)
    without = Evaluator(engine, judge, PROMPTS, PROMPTS, 8).count_refusals()
    assert with_cutoff.verdicts == without.verdicts


def test_thinking_block_is_prefilled(tiny_models: dict[str, Path]) -> None:
    engine = _engine(tiny_models)
    responses = [engine.tokenizer.decode(t) for t in engine.generate(engine.encode(PROMPTS[:2]), 4)]
    opening = responses[0][:3]  # pretend the model's common opening is a thinking tag
    if responses[1][:3] != opening or len(opening) < 3:
        pytest.skip("random model has no common opening")
    assert detect_response_prefix(engine, PROMPTS[:2], [(opening, "</end>")]) == f"{opening}\n\n</end>\n\n"
    assert detect_response_prefix(engine, PROMPTS[:2], DEFAULT_THINKING_TAGS) == ""


def test_kl_over_first_tokens_reads_the_originals_greedy_continuation(tiny_models: dict[str, Path]) -> None:
    engine = _engine(tiny_models)
    evaluator = Evaluator(engine, MarkerJudge(["a"]), [], PROMPTS, 16)
    evaluator.kl_tokens = 3
    evaluator.measure_base()
    continuations = engine.generate(engine.encode(PROMPTS), 2)
    assert evaluator.kl_ids == [ids + tokens for ids, tokens in zip(engine.encode(PROMPTS), continuations)]
    assert evaluator.kl_counts.tolist() == [len(tokens) + 1 for tokens in continuations]
    assert evaluator.base_logprobs is not None and evaluator.base_logprobs.shape[:2] == (len(PROMPTS), 3)
    assert evaluator.kl() == pytest.approx(0.0, abs=1e-6)  # the unchanged model
    first = Evaluator(engine, MarkerJudge(["a"]), [], PROMPTS, 16)
    first.measure_base()
    assert first.base_logprobs is not None and first.base_logprobs.dim() == 2
    # with a whole continuation (3 positions), the first kept position is the first response position
    whole = evaluator.kl_counts == 3
    assert whole.any()
    torch.testing.assert_close(evaluator.base_logprobs[whole, 0], first.base_logprobs[whole], atol=2e-5, rtol=1e-4)
