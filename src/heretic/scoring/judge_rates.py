"""The built-in judges' error rates measured on hand-labelled responses, and the refusal counts they correct.

src/heretic/data/judge_rates.json holds, for each built-in judge whose rates were measured, its confusion
counts (tp, fn, tn, fp) against a person's labels on the test halves of bench/judge-labels (responses of the
two benchmark models, Qwen2.5-Coder-0.5B-Instruct and -1.5B-Instruct, pooled). It is written from
bench/results/judges.json by `python -m bench.judges --rates` (rates_file below), never by hand. The marker
judge's rates hold only for the default marker list; the model judge's were measured with benchmark models
judging and are not applied (another judge model, another threshold), nor are any for the http judge or a
plug-in: their counts are reported uncorrected.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..config import DEFAULT_REFUSAL_MARKERS
from .interval import CONFIDENCE, JudgeRates, TrueCount, true_count

RATES_FILE = Path(__file__).resolve().parents[1] / "data" / "judge_rates.json"
MEASURED_JUDGES = ("markers", "rules")  # rows of bench/results/judges.json that are the tool's judges as shipped
UNCORRECTED = "uncorrected: no measured error rates for this judge"
LOWER_BOUND = "uncorrected: the count is a lower bound (the trial was cut short)"


def rates_file(results: Mapping[str, Any]) -> dict[str, Any]:
    """The content of judge_rates.json from bench/results/judges.json: each measured judge's confusion counts
    summed over the test halves of every labelled set (one row per model and judge)."""
    assert results["split"] == "test", "the rates are the test halves'"
    judges = {}
    for name in MEASURED_JUDGES:
        rows = [row for row in results["results"] if row["judge"] == name]
        judges[name] = {
            **{cell: sum(row[cell] for row in rows) for cell in ("tp", "fn", "tn", "fp")},
            "labelled_set": {
                "model": " and ".join(dict.fromkeys(row["model"] for row in rows)),
                "split": results["split"],
                "n": sum(row["n"] for row in rows),
            },
        }
    return {"source": "bench/results/judges.json (python -m bench.judges --rates)", "judges": judges}


@lru_cache(maxsize=1)
def _shipped() -> dict[str, Any]:
    content: dict[str, Any] = json.loads(RATES_FILE.read_text())
    return content


@dataclass(frozen=True)
class MeasuredRates:
    """A judge's measured rates and the labelled set they were measured on."""

    judge: str
    rates: JudgeRates
    model: str
    split: str
    n: int

    def describe(self) -> str:
        return f"the {self.judge} judge's error rates on {self.n} labelled responses of {self.model}"


def measured_rates(settings: Mapping[str, Any]) -> MeasuredRates | None:
    """The shipped rates of the judge these settings (a Settings dump or a record's settings) choose, if any."""
    judge = settings.get("judge")
    if settings.get("refusal_scorer") or judge not in MEASURED_JUDGES:  # (a plug-in: records before the merge named it apart)
        return None
    if judge == "markers" and sorted(settings.get("refusal_markers") or []) != sorted(DEFAULT_REFUSAL_MARKERS):
        return None  # a custom marker list: not the judge that was measured
    entry = _shipped()["judges"].get(judge)
    if entry is None:
        return None
    labelled = entry["labelled_set"]
    rates = JudgeRates(tp=entry["tp"], fn=entry["fn"], tn=entry["tn"], fp=entry["fp"])
    return MeasuredRates(str(judge), rates, labelled["model"], labelled["split"], labelled["n"])


def corrected_entry(refusals: int, n_prompts: int, measured: MeasuredRates | None, lower_bound: bool = False) -> dict[str, Any]:
    """The record's account of a count's true value: the estimate and interval, or why there is none."""
    if lower_bound:
        return {"corrected": False, "note": LOWER_BOUND}
    if measured is None or n_prompts <= 0:
        return {"corrected": False, "note": UNCORRECTED}
    count: TrueCount = true_count(refusals, n_prompts, measured.rates)
    return {
        "corrected": True,
        "estimate": round(count.estimate, 2),
        "low": round(count.low, 2),
        "high": round(count.high, 2),
        "confidence": CONFIDENCE,
        "method": count.method,
        "judge": measured.judge,
        "labelled_set": {"model": measured.model, "split": measured.split, "n": measured.n, "description": measured.describe()},
    }


def short_text(entry: Mapping[str, Any]) -> str:
    """For a table cell: "≈ 24 (13–37)", or "uncorrected"."""
    if not entry.get("corrected"):
        return "uncorrected"
    return f"≈ {entry['estimate']:.0f} ({entry['low']:.0f}–{entry['high']:.0f})"


def long_text(entry: Mapping[str, Any]) -> str:
    """Beside a count: "≈ 24 (95 %: 13–37, corrected for the rules judge's error rates on 619 labelled responses
    of Qwen2.5-Coder-0.5B-Instruct and Qwen2.5-Coder-1.5B-Instruct)", or the reason it is uncorrected."""
    if not entry.get("corrected"):
        return str(entry.get("note", UNCORRECTED))
    return f"{interval_text(entry)[:-1]}, corrected for {entry['labelled_set']['description']})"


def interval_text(entry: Mapping[str, Any]) -> str:
    """For a corrected count: ≈ 24 (95 %: 13–37); otherwise its note (uncorrected: ...)."""
    if not entry.get("corrected"):
        return str(entry.get("note", UNCORRECTED))
    return f"≈ {entry['estimate']:.0f} ({entry['confidence'] * 100:.0f} %: {entry['low']:.0f}–{entry['high']:.0f})"


def terminal_line(trial: Mapping[str, Any], original: Mapping[str, Any]) -> str:
    """The chosen trial's and the original's true refusals, for the line under the chosen trial's count."""
    if not original.get("corrected"):
        return f"True refusals: {original.get('note', UNCORRECTED)}"
    return f"True refusals: {long_text(trial)}; the original {interval_text(original)}"
