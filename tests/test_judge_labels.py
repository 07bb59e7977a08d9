"""The hand-labelled refusal sets in bench/judge-labels: complete, consistent, split by prompt."""

from __future__ import annotations

import collections

import pytest

from bench.harness.labels import LABELS, SETS, load_labelled, split_of
from heretic.scoring.rules import RuleJudge

RULES = RuleJudge()


def test_every_response_has_a_label_and_a_half() -> None:
    rows = load_labelled()
    assert len(rows) == 700
    assert {row["label"] for row in rows} <= set(LABELS)
    kinds = collections.Counter(row["kind"] for row in rows)
    assert kinds["harmful"] >= 600 and kinds["harmless"] >= 100
    assert len({row["config"] for row in rows if row["kind"] == "harmful"}) == 6
    assert all(row["note"] for row in rows if row["label"] == "unclear")


def test_the_second_models_set_is_complete() -> None:
    """Qwen2.5-Coder-1.5B-Instruct: the original and four trials on harmful prompts, harmless prompts with the
    original and the strongest trial; every response labelled and marked by reading."""
    rows = load_labelled(None, SETS["1.5b"])
    assert len(rows) >= 400
    assert {row["label"] for row in rows} <= set(LABELS)
    assert len({row["config"] for row in rows if row["kind"] == "harmful"}) == 5
    assert len({row["config"] for row in rows if row["kind"] == "harmless"}) == 2
    assert all(row["note"] for row in rows if row["label"] == "unclear")
    assert all(isinstance(row["degenerate"], bool) for row in rows)


@pytest.mark.parametrize("model", sorted(SETS))
def test_split_is_by_prompt(model: str) -> None:
    rows = load_labelled(None, SETS[model])
    halves: dict[tuple[str, int], set[str]] = collections.defaultdict(set)
    for row in rows:
        assert row["split"] == split_of(row["prompt"])
        halves[(row["kind"], row["prompt_index"])].add(row["split"])
    assert all(len(split) == 1 for split in halves.values())
    dev, test = load_labelled("dev", SETS[model]), load_labelled("test", SETS[model])
    assert len(dev) + len(test) == len(rows)
    assert not {row["prompt"] for row in dev} & {row["prompt"] for row in test}


def test_unknown_split_is_rejected() -> None:
    with pytest.raises(ValueError):
        load_labelled("train")


def test_rules_early_verdicts_are_exact_on_every_labelled_response() -> None:
    """Every response of the hand-labelled set, cut after every few characters: no early verdict differs
    from the verdict on the whole response, and most refusals (those with a declining opening; lectures
    wait for the window) are decided within their first 60 characters."""
    rows = load_labelled(None) + load_labelled(None, SETS["1.5b"])
    decided_early = 0
    for row in rows:
        response, final = row["response"], RULES.is_refusal(row["response"])
        early = [RULES.verdict_so_far(response[:n]) for n in range(0, len(response), 3)]
        assert all(verdict in (None, final) for verdict in early), row["id"]
        decided_early += final and any(verdict is not None for verdict in early[:20])
    assert decided_early >= 0.6 * sum(RULES.is_refusal(row["response"]) for row in rows)
