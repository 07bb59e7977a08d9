"""The refusal count corrected for the judge's measured error rates (scoring/interval.py)."""

from __future__ import annotations

import numpy as np
import pytest

from heretic.scoring.interval import (
    METHOD_EXACT,
    JudgeRates,
    clopper_pearson,
    corrected_bounds,
    rogan_gladen,
    true_count,
)

# The test half's labelled set: 69 refusals and 298 compliances; the rules and markers judges' counts on it.
REFUSALS, COMPLIANCES = 69, 298
MEASURED = {"rules": (39, 289), "markers": (31, 295)}  # (tp, tn)


@pytest.mark.parametrize(("k", "n"), [(0, 64), (1, 64), (16, 64), (63, 64), (64, 64), (7, 100), (50, 367)])
def test_a_perfect_judge_gets_the_exact_binomial_interval(k: int, n: int) -> None:
    stats = pytest.importorskip("scipy.stats")
    low = 0.0 if k == 0 else stats.beta.ppf(0.025, k, n - k + 1)
    high = 1.0 if k == n else stats.beta.ppf(0.975, k + 1, n - k)
    count = true_count(k, n, None)
    assert count.estimate == k and count.method == METHOD_EXACT
    assert count.low == pytest.approx(n * low, abs=1e-7) and count.high == pytest.approx(n * high, abs=1e-7)


def test_rogan_gladen_inverts_the_judges_errors_and_clips() -> None:
    se, sp = 0.6, 0.95
    assert rogan_gladen(se * 0.3 + (1 - sp) * 0.7, se, sp) == pytest.approx(0.3)
    assert rogan_gladen(0.01, se, sp) == 0.0
    assert rogan_gladen(0.99, se, sp) == 1.0


def test_the_corrected_count_is_deterministic_and_holds_its_estimate() -> None:
    rates = JudgeRates(tp=39, fn=30, tn=289, fp=9)
    first, second = true_count(16, 64, rates), true_count(16, 64, rates)
    assert first == second
    assert first.low < first.estimate < first.high
    assert first.estimate == pytest.approx(64 * (16 / 64 + 289 / 298 - 1) / (39 / 69 + 289 / 298 - 1))
    # the uncertainty of Se and Sp widens it beyond the interval the measured rates would give if exact
    exact = [64 * rogan_gladen(bound, rates.sensitivity, rates.specificity) for bound in clopper_pearson(16, 64)]
    assert first.high - first.low > 0.9 * (exact[1] - exact[0])


def reference_bounds(counts: np.ndarray, n: int, se: float, sp: float) -> tuple[np.ndarray, np.ndarray]:
    """The interval with the true Se and Sp: the Clopper–Pearson interval of the apparent rate, mapped through
    the Rogan–Gladen formula with the true rates (exact when Se and Sp are known)."""
    table = {k: [rogan_gladen(bound, se, sp) for bound in clopper_pearson(k, n)] for k in set(counts.tolist())}
    return np.array([table[k][0] for k in counts]), np.array([table[k][1] for k in counts])


@pytest.mark.parametrize("judge", sorted(MEASURED))
def test_the_interval_covers_the_truth_in_simulation(judge: str) -> None:
    """Labelled sets of the measured size drawn with the measured rates taken as true, counts of 100 responses
    at several true refusal rates: the interval covers the true rate in at least 93 % of 1000 runs at each, and
    its mean width is at most 1.3 times that of the interval with the true rates."""
    tp, tn = MEASURED[judge]
    se, sp, n, runs = tp / REFUSALS, tn / COMPLIANCES, 100, 1000
    rng = np.random.default_rng(7)
    for prevalence in (0.05, 0.15, 0.3, 0.5, 0.7):
        apparent = se * prevalence + (1 - sp) * (1 - prevalence)
        counts = rng.binomial(n, apparent, runs)
        caught, passed = rng.binomial(REFUSALS, se, runs), rng.binomial(COMPLIANCES, sp, runs)
        rates = caught, REFUSALS - caught, passed, COMPLIANCES - passed
        low, high = corrected_bounds(counts, n, rates, draws=2000)
        coverage = float(np.mean((low <= prevalence) & (prevalence <= high)))
        ref_low, ref_high = reference_bounds(counts, n, se, sp)
        ratio = float(np.mean(high - low) / np.mean(ref_high - ref_low))
        assert coverage >= 0.93, (judge, prevalence, coverage)
        assert ratio <= 1.3, (judge, prevalence, ratio)


def test_the_shipped_rates_are_the_benchmarks_test_half() -> None:
    """judge_rates.json is what `python -m bench.judges --rates` writes from bench/results/judges.json."""
    import json
    from pathlib import Path

    from heretic.scoring.judge_rates import RATES_FILE, rates_file

    results = json.loads((Path(__file__).resolve().parents[1] / "bench" / "results" / "judges.json").read_text())
    assert rates_file(results) == json.loads(RATES_FILE.read_text())
    assert json.loads(RATES_FILE.read_text())["judges"]["rules"] == {
        "tp": 90,
        "fn": 56,
        "tn": 456,
        "fp": 17,
        "labelled_set": {"model": "Qwen2.5-Coder-0.5B-Instruct and Qwen2.5-Coder-1.5B-Instruct", "split": "test", "n": 619},
    }


def test_only_the_measured_judges_get_rates() -> None:
    from heretic.config import Settings
    from heretic.scoring.judge_rates import measured_rates

    rules = measured_rates(Settings().model_dump())
    assert rules is not None and rules.judge == "rules" and rules.rates == JudgeRates(tp=90, fn=56, tn=456, fp=17)
    markers = measured_rates(Settings(judge="markers").model_dump())
    assert markers is not None and markers.rates == JudgeRates(tp=78, fn=68, tn=463, fp=10)
    assert measured_rates(Settings(refusal_markers=["sorry"]).model_dump()) is None  # a custom list
    assert measured_rates(Settings(judge="model").model_dump()) is None
    assert measured_rates({"judge": "http"}) is None
    assert measured_rates({"judge": "rules", "refusal_scorer": "my_judge.py:Judge"}) is None


def test_the_terminal_line_gives_both_counts_and_where_the_rates_come_from() -> None:
    from heretic.scoring.judge_rates import corrected_entry, measured_rates, terminal_line

    rates = measured_rates({"judge": "rules"})
    trial, original = true_count(6, 64, JudgeRates(90, 56, 456, 17)), true_count(16, 64, JudgeRates(90, 56, 456, 17))
    line = terminal_line(corrected_entry(6, 64, rates), corrected_entry(16, 64, rates))
    assert line == (
        f"True refusals: ≈ {trial.estimate:.0f} (95 %: {trial.low:.0f}–{trial.high:.0f}, corrected for the rules judge's "
        f"error rates on 619 labelled responses of Qwen2.5-Coder-0.5B-Instruct and Qwen2.5-Coder-1.5B-Instruct); the "
        f"original ≈ {original.estimate:.0f} "
        f"(95 %: {original.low:.0f}–{original.high:.0f})"
    )
    assert line.startswith("True refusals: ≈ 6 (95 %: 0–17, ")  # (6/64 + Sp − 1)/(Se + Sp − 1)·64 = 6.4
    uncorrected = terminal_line(corrected_entry(6, 64, None), corrected_entry(16, 64, None))
    assert uncorrected == "True refusals: uncorrected: no measured error rates for this judge"
    cut = terminal_line(corrected_entry(6, 64, rates, lower_bound=True), corrected_entry(16, 64, rates))
    assert cut.startswith("True refusals: uncorrected: the count is a lower bound") and "the original ≈ 24" in cut


def test_the_front_table_shows_the_true_refusals_beside_the_count() -> None:
    from rich.console import Console

    from heretic.search.pareto import TrialResult
    from heretic.search.tables import front_table

    front = [TrialResult(3, 6, 0.05, False, 1.0, {}), TrialResult(5, 2, 0.2, False, 1.0, {})]
    console = Console(width=200, record=True)
    console.print(front_table(front, 64, true_refusals={3: "≈ 8 (1–20)", 5: "uncorrected"}))
    text = console.export_text()
    assert "true refusals" in text and "(95 %)" in text
    assert "│     3 │     6/64 │    ≈ 8 (1–20) │ 0.0500 │" in text and "uncorrected" in text
