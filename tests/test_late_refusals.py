"""bench/late_refusals.py: a response read at 300 characters, 100 tokens and 200 tokens, and the verdicts that change."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.late_refusals import (
    LENGTHS,
    changes,
    judge_readings,
    make_judges,
    readings,
    right_changes,
    shorter_than,
    summary,
    window_prefix,
)
from heretic.prompts import Prompt
from heretic.scoring.rules import normalize

WORDS = [f"word{i}" for i in range(250)]


def decode(ids: list[int]) -> str:
    """A tokenizer whose token i is " word{i}" (the first without its space)."""
    return " ".join(WORDS[i] for i in ids)


def test_window_prefix_is_the_shortest_start_holding_the_window() -> None:
    text = "**Sure**,   here   is #it.\n\n" + "a  *b*  " * 120
    prefix = window_prefix(text)
    assert text.startswith(prefix)
    assert len(normalize(prefix)) >= 300 > len(normalize(prefix[:-1]))
    assert window_prefix("short **answer**") == "short **answer**"


def test_readings_cut_at_each_length_and_keep_short_responses_whole() -> None:
    ids = list(range(250))
    read = readings(decode(ids), ids, decode)
    assert read["100 tokens"] == decode(ids[:100]) and read["200 tokens"] == decode(ids[:200])
    assert len(normalize(read["300 chars"])) == 300
    short = readings("Only this.", [0, 1, 2], decode)
    assert all(text == "Only this." for text in short.values())
    assert shorter_than(["Only this.", decode(ids)], [3, 250]) == {"300 chars": 1, "100 tokens": 1, "200 tokens": 1}


def test_changes_count_each_direction_and_the_right_ones() -> None:
    before, after = [False, False, True, True, False], [True, False, False, True, True]
    assert changes(before, after) == {"to_refusal": 2, "to_compliance": 1}
    verdicts = {"300 chars": before, "100 tokens": after, "200 tokens": after}
    right = right_changes(verdicts, [True, None, True, True, None])
    assert right == {"300 chars -> 100 tokens": 1, "100 tokens -> 200 tokens": 0, "300 chars -> 200 tokens": 1}


def test_a_late_decline_changes_only_the_whole_reading_judge() -> None:
    """Compliance in the first 100 tokens, a decline after them: the window rules miss it at every length,
    the whole-response rules count it from the 200-token reading on."""
    opening = "Sure, here is an overview of the topic. " + "The history of the subject is long and varied. " * 11
    words = (opening + "However, I cannot provide instructions for this.").split()
    assert 100 < len(words) < 200
    response, ids = " ".join(words), list(range(len(words)))
    read = readings(response, ids, lambda part: " ".join(words[i] for i in part))
    assert "cannot" not in read["100 tokens"] and read["200 tokens"] == response
    judges = make_judges(["rules", "rules-whole"])
    prompt = [Prompt("You are a helpful assistant.", "Explain it.")]
    results = {name: summary(judge_readings(judge, prompt, [read])) for name, judge in judges.items()}
    assert results["rules"]["refusals"] == dict.fromkeys(LENGTHS, 0)
    assert results["rules-whole"]["refusals"] == {"300 chars": 0, "100 tokens": 0, "200 tokens": 1}
    assert results["rules-whole"]["changes"]["100 tokens -> 200 tokens"] == {"to_refusal": 1, "to_compliance": 0}
    assert results["rules-whole"]["changes"]["300 chars -> 100 tokens"] == {"to_refusal": 0, "to_compliance": 0}


def test_front_trials_keep_the_front_with_parameters_fewest_refusals_first() -> None:
    from bench.harness.tools import front_trials

    stored = [
        {"number": 0, "refusals": 80, "kl": 0.017, "params": {"a": 1}},
        {"number": 1, "refusals": 8, "kl": 0.068, "params": {"a": 1}},
        {"number": 2, "refusals": 16, "kl": 0.041, "params": {"a": 1}},
        {"number": 3, "refusals": 15, "kl": 0.066, "params": {"a": 1}},
        {"number": 4, "refusals": 55, "kl": 0.090, "params": {"a": 1}},  # dominated
        {"number": 5, "refusals": 2, "kl": 0.5, "params": {"a": 1}, "cut": True},  # cut short: not a measured trial
        {"number": 6, "refusals": 1, "kl": 0.9},  # no parameters to replay
    ]
    assert [t["number"] for t in front_trials(stored, 10)] == [1, 3, 2, 0]
    assert [t["number"] for t in front_trials(stored, 2)] == [1, 3]


def test_a_stored_run_of_another_model_is_refused_in_one_sentence(tmp_path: Path) -> None:
    from bench.harness.tools import stored_run

    results = tmp_path / "run.json"
    results.write_text(json.dumps({"settings": {"model": "demo"}, "tools": {"ours": {"trials": [{"params": {}}]}}}))
    with pytest.raises(SystemExit, match="is a run of the demo model, not of 1.5b"):
        stored_run(results, "1.5b", tmp_path / "checkpoints")
