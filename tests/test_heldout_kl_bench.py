"""bench/heldout_kl.py: rank correlations of in-search, mixed and held-out KL, and the trial each KL chooses."""

from __future__ import annotations

from typing import Any

import pytest

from bench.heldout_kl import chosen, rho, summarize


def entry(rows: list[tuple[int, int, list[float], list[float], list[float]]], declines: list[bool]) -> dict[str, Any]:
    """A measurement: (number, refusals, search KLs, candidate KLs, held-out KLs) per trial."""
    return {
        "original_declines": {"heldout": declines, "candidates": [True, True]},
        "trials": [{"number": n, "refusals": r, "kl": {"search": s, "candidates": c, "heldout": h}} for n, r, s, c, h in rows],
    }


def test_rho_is_spearmans_rank_correlation() -> None:
    assert rho([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert rho([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert rho([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)


def test_chosen_is_the_fewest_refusals_under_the_cap_on_the_front() -> None:
    trials = [
        {"number": 0, "refusals": 3, "search": 0.6},  # fewest refusals, over the cap
        {"number": 1, "refusals": 5, "search": 0.4},
        {"number": 2, "refusals": 5, "search": 0.3},  # same refusals, lower KL
        {"number": 3, "refusals": 9, "search": 0.1},
    ]
    assert chosen(trials, "search")["number"] == 2
    assert chosen(trials, "search", max_kl=0.05)["number"] == 3  # none under the cap: the lowest KL


def test_a_candidate_set_that_sees_the_tail_changes_the_choice() -> None:
    # Trial 1 looks best on the search's prompts but is far off on the disclaimer prompts, held out and candidate alike.
    measured = entry(
        [
            (0, 10, [0.10, 0.10], [0.10, 0.10], [0.10, 0.10, 0.10]),
            (1, 4, [0.20, 0.20], [3.00, 3.00], [0.20, 3.00, 0.20]),
            (2, 6, [0.30, 0.30], [0.30, 0.30], [0.30, 0.30, 0.30]),
        ],
        declines=[False, True, False],
    )
    summary = summarize(measured)
    assert summary["chosen"]["search"]["number"] == 1
    assert summary["chosen"]["mixed"]["number"] == 2  # trial 1's mixed KL, (0.4 + 6) / 4 = 1.6, is over the cap
    assert summary["heldout_declined_prompts"] == 1
    assert summary["rho"]["search_heldout_answered"] == pytest.approx(1.0)
    assert summary["rho"]["mixed_heldout"] == pytest.approx(1.0)
    assert summary["rho"]["search_heldout"] == pytest.approx(0.5)
    assert summary["supports_candidates"]


def test_no_support_when_the_mixed_kl_changes_nothing() -> None:
    measured = entry(
        [(n, 10 - n, [0.1 * n] * 2, [0.1 * n] * 2, [0.1 * n] * 3) for n in range(4)],
        declines=[False, False, False],
    )
    summary = summarize(measured)
    assert summary["rho"]["search_heldout"] == pytest.approx(summary["rho"]["mixed_heldout"])
    assert summary["chosen"]["search"]["number"] == summary["chosen"]["mixed"]["number"]
    assert "search_heldout_declined" not in summary["rho"]
    assert not summary["supports_candidates"]
