"""Our runs as run_bench recorded them: a results file's trials, wall time and command, and the trial
the run chose with its held-out refusals (from its log in bench/runs)."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path
from typing import Any

from .paths import RUNS, WORK


def our_run(path: Path, budget_s: float | None = None) -> dict[str, Any]:
    """One run_bench results file of ours: seed, trials, wall time and the (refusals, KL) of its uncut trials.

    With `budget_s` (a timed run), only the trials that ended within that much wall time of one
    uninterrupted run count (run_bench's per-trial `wall_s`: a run continued over several sittings is
    timed as if it had run in one); results without per-trial times count whole."""
    data = json.loads(path.read_text())
    ((label, tool),) = data["tools"].items()
    trials, wall = tool["trials"], tool["wall_s"]
    if budget_s is not None and all("wall_s" in t for t in trials):
        wall = min(max(t["wall_s"] for t in trials), budget_s)
        trials = [t for t in trials if t["wall_s"] <= budget_s]
    points = [(t["refusals"], t["kl"]) for t in trials if not t.get("cut")]
    return {
        "file": path.name,
        "label": label,
        "seed": data["settings"]["seed"],
        "trials": len(trials),
        "trials_run": tool["n_trials"],
        "wall_s": wall,
        "median_trial_s": statistics.median(t["seconds"] for t in trials),
        "chosen": chosen_trial(label),
        "command": tool["command"].split(" --refusal-markers")[0] + " ... " + tool["command"].split("--headless")[-1].strip(),
        "points": points,
    }


def chosen_trial(label: str) -> dict[str, Any] | None:
    """The trial the run chose and its held-out refusals, from its (last sitting's) log in bench/runs (or in
    bench/work, where runs were kept before; None without it)."""
    folder = RUNS / label if (RUNS / label).exists() else WORK / label
    record = folder / "runs.json"
    path = folder / (json.loads(record.read_text())[-1]["log"] if record.exists() else "output.log")
    if not path.exists():
        return None
    # The log's lines, each without its elapsed-time column, joined: the console wraps long lines.
    text = " ".join(re.sub(r"^\s*[\d.]+s  ", "", line) for line in path.read_text(errors="replace").splitlines())
    # "Chosen trial N: R/100 refusals[ (verified on whole responses ...)], KL X"
    chosen = re.search(r"Chosen trial (\d+): (\d+)/\d+ refusals(?: \([^)]*\))?, KL ([\d.]+)", text)
    heldout = re.search(r"Held-out harmful prompts .*?: (\d+)/\d+ refusals .*?original (\d+)/\d+", text)
    if chosen is None or heldout is None:
        return None
    return {
        "trial": int(chosen[1]),
        "refusals": int(chosen[2]),
        "kl": float(chosen[3]),
        "heldout": int(heldout[1]),
        "original_heldout": int(heldout[2]),
    }
