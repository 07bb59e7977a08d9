"""Kinds of refusal direction compared as full searches, on both benchmark models.

Each run is a run_bench results file of our search (30 trials, the benchmark's settings) with one kind
of direction (an option of the commit that ran it), listed in bench/direction-runs.json as {MODEL: {METHOD: [file, ...]}} (one file
per seed). For each model and method: the median over seeds of the best KL within each refusal cap,
the mean hypervolume, the fewest refusals at KL <= 0.10, the chosen trial with its held-out refusals,
the median trial time and the start-up time. A method *wins* on a model when its median best KL is at
most the current default's at every target cap of that model and its mean hypervolume is at least the
default's; it becomes the default only where it wins on both models.

    python -m bench.direction_fronts

Writes bench/results/front-summary.json and the "direction-methods" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from bench.harness.metrics import KL_CAP, fewest_refusals, hypervolume, median_best
from bench.harness.paths import RESULTS
from bench.harness.publish import recorded, update_section
from bench.harness.runs import our_run

RUNS = Path(__file__).resolve().parent / "direction-runs.json"
SUMMARY = RESULTS / "front-summary.json"
CAPS = ("2", "3", "5", "10", "20", "30", "40")
TARGET_CAPS = {"demo": (10, 20, 30), "1.5b": (2, 3, 5)}
DEFAULT, PREVIOUS_DEFAULT = "mean", "mean"  # the current default and the one before the comparison
N_PROMPTS = 100


def recorded_chosen(name: str) -> dict[str, Any] | None:
    """The chosen trial of run `name` as a seed_fronts results file recorded it (for a run whose log is gone)."""
    for path in sorted(RESULTS.glob("seed-fronts-*.json")):
        for trial in json.loads(path.read_text()).get("trials", []):
            if trial.get("file") == name and trial.get("chosen"):
                chosen: dict[str, Any] = trial["chosen"]
                return chosen
    return None


def method_summary(files: list[str]) -> dict[str, Any]:
    """The summary of one method on one model, over its runs (one per seed)."""
    runs = [our_run(RESULTS / name) for name in files]
    data = [json.loads((RESULTS / name).read_text()) for name in files]
    startup = [next(iter(d["tools"].values())).get("time_to_first_trial_s") for d in data]
    chosen = [c for c in (run["chosen"] or recorded_chosen(name) for run, name in zip(runs, files)) if c]
    middle = sorted(chosen, key=lambda c: (c["refusals"], c["kl"]))[len(chosen) // 2] if chosen else None
    fewest = [fewest_refusals(run["points"], 0.10) for run in runs]
    return {
        "seeds": [run["seed"] for run in runs],
        "files": files,
        "median_best_kl": {cap: median_best(runs, int(cap)) for cap in CAPS},
        "hypervolume": statistics.mean(hypervolume(run["points"], (N_PROMPTS, KL_CAP)) for run in runs),
        "fewest_refusals_at_kl_0.10": statistics.median(n if n is not None else N_PROMPTS for n in fewest),
        "chosen": middle and {"refusals": middle["refusals"], "kl": middle["kl"], "heldout_refusals": middle["heldout"]},
        "median_trial_s": statistics.median(run["median_trial_s"] for run in runs),
        "startup_s": statistics.median(s for s in startup if s is not None) if any(startup) else None,
    }


def wins(method: dict[str, Any], default: dict[str, Any], model: str) -> bool:
    """At most the default's median best KL at every target cap (no trial within a cap: worst), and at least
    its mean hypervolume."""

    def at(summary: dict[str, Any], cap: int) -> float:
        value = summary["median_best_kl"][str(cap)]
        return float("inf") if value is None else value

    caps_met = all(at(method, cap) <= at(default, cap) for cap in TARGET_CAPS[model])
    return caps_met and method["hypervolume"] >= default["hypervolume"]


def table(summary: dict[str, Any]) -> str:
    lines = []
    for model, entry in summary["models"].items():
        caps = TARGET_CAPS[model]
        lines += [
            f"**{model}** (target caps {', '.join(map(str, caps))})",
            "",
            "| method | seeds | " + " | ".join(f"best KL ≤ {cap}" for cap in caps) + " | hypervolume | fewest at KL ≤ 0.10 "
            "| chosen (held-out) | median trial | start-up | wins |",
            "|---" * (len(caps) + 8) + "|",
        ]
        for name, method in entry["methods"].items():
            kls = " | ".join("—" if (v := method["median_best_kl"][str(cap)]) is None else f"{v:.3f}" for cap in caps)
            chosen = method["chosen"]
            chosen_text = f"{chosen['refusals']} at {chosen['kl']:.3f} ({chosen['heldout_refusals']})" if chosen else "—"
            startup = "—" if method["startup_s"] is None else f"{method['startup_s']:.0f} s"
            lines.append(
                f"| {name} | {', '.join(map(str, method['seeds']))} | {kls} | {method['hypervolume']:.1f} "
                f"| {method['fewest_refusals_at_kl_0.10']:g} | {chosen_text} | {method['median_trial_s']:.1f} s "
                f"| {startup} | {'yes' if method.get('wins') else '—' if name == DEFAULT else 'no'} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    manifest: dict[str, dict[str, list[str]]] = json.loads(RUNS.read_text())
    models: dict[str, Any] = {}
    for model, methods in manifest.items():
        summaries = {name: method_summary(files) for name, files in methods.items() if files}
        for name, method in summaries.items():
            if name != DEFAULT and DEFAULT in summaries:
                method["wins"] = wins(method, summaries[DEFAULT], model)
        models[model] = {"methods": summaries}
    winners = [
        name
        for name in {name for entry in models.values() for name in entry["methods"]}
        if all(entry["methods"].get(name, {}).get("wins") for entry in models.values())
    ]
    summary = {"default": winners[0] if len(winners) == 1 else DEFAULT, "previous_default": PREVIOUS_DEFAULT, "models": models}
    SUMMARY.write_text(json.dumps(summary, indent=1) + "\n")
    text = table(summary)
    runs = [
        json.loads((RESULTS / name).read_text())["settings"]
        for methods in manifest.values()
        for files in methods.values()
        for name in files
    ]
    update_section(
        "Kinds of refusal direction as full searches (runs listed in bench/direction-runs.json).\n\n" + text,
        "direction-methods",
        recorded(*runs),
        "python -m bench.direction_fronts",
    )
    print(text)


if __name__ == "__main__":
    main()
