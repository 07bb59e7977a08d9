"""Issue targets of the model we hand out, over several seeds of our search: equal trials and equal time.

Reads run_bench results of our search under the default judge (`--judge rules`) and the reference's
trials replayed and counted by the same judge (bench/rescore_fronts.py), and checks:

- equal trials: at every refusal cap from 10 to 40, the median over our seeds of the best KL within
  the cap is at most 0.7x the reference's best KL there (one replayed run of the reference; where the
  reference has no trial within a cap and we have one, we are better there);
- equal time (runs given a time budget with --search-minutes): the fewest refusals at KL <= 0.10
  (target: at most 5/100), and how much of the reference's wall time each run had.

    python bench/seed_fronts.py --trials 20261202-142140.json 20261202-162218.json 20261202-163939.json \
        --timed 20261202-164313.json

Writes bench/results/seed-fronts.json, bench/results/fronts-seeds.png and the "seeds" section of
BENCHMARKS.md (with --name NAME: seed-fronts-NAME.json, fronts-NAME.png and the NAME section). Our trials cut short as dominated have only a lower bound on their refusals and are
left out of the fronts (they are dominated by trials that are in them).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_bench import KL_CAP, RESULTS, WORK, hypervolume, pareto, update_benchmarks_md  # noqa: E402

CAPS = list(range(10, 41))  # the refusal caps of the equal-trials target
SHOWN_CAPS = [10, 15, 20, 25, 30, 35, 40]
RATIO_TARGET = 0.7
KL_TARGET, REFUSALS_TARGET = 0.10, 5
REFERENCE_RESULTS = RESULTS / "reference-73baa3e6a27f.json"  # the reference's full run: its wall time


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
    """The trial the run chose and its held-out refusals, from its (last sitting's) log in bench/work
    (None without it)."""
    record = WORK / label / "runs.json"
    path = WORK / label / (json.loads(record.read_text())[-1]["log"] if record.exists() else "output.log")
    if not path.exists():
        return None
    text = path.read_text(errors="replace")
    chosen = re.search(r"Chosen trial (\d+): (\d+)/\d+ refusals, KL ([\d.]+)", text)
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


def reference_points() -> list[tuple[int, float]]:
    """The reference's 30 trials replayed, counted by rules (bench/rescore_fronts.py)."""
    rows = json.loads((RESULTS / "rescored-fronts.json").read_text())["tools"]["reference"]["rows"]
    return [(row["refusals"]["rules"], row["kl"]) for row in rows]


def best_kl(points: list[tuple[int, float]], cap: int) -> float | None:
    within = [kl for refusals, kl in points if refusals <= cap]
    return min(within) if within else None


def median_best(runs: list[dict[str, Any]], cap: int) -> float | None:
    """Median over runs of the best KL within the cap; a run with no trial within it counts as worst."""
    values = [best_kl(run["points"], cap) for run in runs]
    median = statistics.median(value if value is not None else float("inf") for value in values)
    return None if median == float("inf") else median


def verdict(ours: float | None, reference: float | None) -> tuple[float | None, bool]:
    """(ours / reference, whether the cap meets the target)."""
    if ours is None:
        return None, False
    if reference is None:
        return None, True  # only we reach the cap
    ratio = ours / reference
    return ratio, ratio <= RATIO_TARGET


def fewest_refusals(points: list[tuple[int, float]], max_kl: float) -> int | None:
    within = [refusals for refusals, kl in points if kl <= max_kl]
    return min(within) if within else None


def compact(numbers: list[int]) -> str:
    """1, 2, 3, 5 -> "1–3, 5"."""
    ranges: list[list[int]] = []
    for number in numbers:
        if ranges and number == ranges[-1][1] + 1:
            ranges[-1][1] = number
        else:
            ranges.append([number, number])
    return ", ".join(f"{a}–{b}" if a != b else str(a) for a, b in ranges)


def fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def summarize(trials: list[dict[str, Any]], timed: list[dict[str, Any]], reference: list[tuple[int, float]]) -> dict[str, Any]:
    reference_wall = json.loads(REFERENCE_RESULTS.read_text())["wall_s"]
    caps = []
    for cap in CAPS:
        ours, theirs = median_best(trials, cap), best_kl(reference, cap)
        ratio, met = verdict(ours, theirs)
        caps.append({"cap": cap, "ours_median": ours, "reference": theirs, "ratio": ratio, "met": met})
    return {
        "reference_wall_s": reference_wall,
        "reference": {"points": reference, "front": pareto(reference), "hypervolume": hypervolume(reference, (100, KL_CAP))},
        "trials": [
            dict(run, front=pareto(run["points"]), hypervolume=hypervolume(run["points"], (100, KL_CAP))) for run in trials
        ],
        "timed": [
            dict(
                run,
                front=pareto(run["points"]),
                hypervolume=hypervolume(run["points"], (100, KL_CAP)),
                share_of_reference_wall=run["wall_s"] / reference_wall,
                fewest_refusals_at_kl_target=fewest_refusals(run["points"], KL_TARGET),
            )
            for run in timed
        ],
        "caps": caps,
        "equal_trials_met": all(row["met"] for row in caps),
    }


def markdown(summary: dict[str, Any], title: str) -> str:
    trials, timed, caps = summary["trials"], summary["timed"], {row["cap"]: row for row in summary["caps"]}
    lines = [
        f"## {title}",
        "",
        "Our search under the default judge (`--judge rules`) at the side-by-side benchmark's settings (demo model, "
        "100 + 100 evaluation prompts, 100-token responses, 10 random start-up trials), against the reference's 30 "
        "trials replayed and counted by the same judge (one run of the reference: the section above). KL does not "
        "depend on the judge.",
        "",
        "| run | seed | trials | wall | median trial | hypervolume | "
        + " | ".join(f"best KL ≤ {cap}" for cap in SHOWN_CAPS)
        + " |",
        "|---|---:|---:|---:|---:|---:|" + "---:|" * len(SHOWN_CAPS),
    ]
    reference = summary["reference"]["points"]
    lines.append(
        f"| reference (replayed) | 42 | 30 | {summary['reference_wall_s'] / 3600:.1f} h | — | {summary['reference']['hypervolume']:.1f} | "
        + " | ".join(fmt(best_kl(reference, cap)) for cap in SHOWN_CAPS)
        + " |"
    )
    for run in [*trials, *timed]:
        lines.append(
            f"| {run['label']} | {run['seed']} | {run['trials']} | {run['wall_s'] / 60:.0f} min | {run['median_trial_s']:.1f} s | "
            f"{run['hypervolume']:.1f} | " + " | ".join(fmt(best_kl(run["points"], cap)) for cap in SHOWN_CAPS) + " |"
        )
    lines.append(
        f"| **ours, median of {len(trials)} seeds (30 trials)** | | | | | | "
        + " | ".join(fmt(caps[cap]["ours_median"]) for cap in SHOWN_CAPS)
        + " |"
    )
    lines.append(
        "| ours / reference | | | | | | "
        + " | ".join(
            (
                "only ours"
                if caps[cap]["ours_median"] is not None
                else "neither"
                if caps[cap]["reference"] is None
                else "only ref."
            )
            if caps[cap]["ratio"] is None
            else f"{caps[cap]['ratio']:.2f}×"
            for cap in SHOWN_CAPS
        )
        + " |"
    )
    neither = [row["cap"] for row in summary["caps"] if row["ours_median"] is None and row["reference"] is None]
    missed = [row["cap"] for row in summary["caps"] if not row["met"] and row["cap"] not in neither]
    lines += [
        "",
        f"- **Equal trials (30)**: target ≤ {RATIO_TARGET}× the reference's best KL at every cap from 10 to 40 "
        f"(median of our seeds): **{'met' if not missed and not neither else 'missed'}**"
        + (f"; above {RATIO_TARGET}× at caps {compact(missed)}" if missed else "")
        + (f"; neither tool (our seeds' median) has a trial within {compact(neither)} refusals" if neither else "")
        + ".",
    ]
    for run in timed:
        fewest = run["fewest_refusals_at_kl_target"]
        full = run["share_of_reference_wall"] >= 0.999
        lines.append(
            f"- **Equal time{'' if full else ', partly'}**: `{run['label']}` (seed {run['seed']}) finished "
            f"{run['trials']} trials in {run['wall_s'] / 60:.0f} min, {run['share_of_reference_wall']:.2f}× the "
            f"reference's wall time for its 30 trials ({summary['reference_wall_s'] / 3600:.1f} h)"
            + (
                f"; the {run['trials_run'] - run['trials']} trials after that are left out"
                if run["trials_run"] > run["trials"]
                else ""
            )
            + f". Fewest refusals at KL ≤ {KL_TARGET}: {fewest if fewest is not None else 'none'}/100 (target ≤ "
            f"{REFUSALS_TARGET}/100: {'met' if fewest is not None and fewest <= REFUSALS_TARGET else 'missed'})."
        )
    full_runs = [run for run in timed if run["share_of_reference_wall"] >= 0.999]
    if len(full_runs) >= 3:
        fewest_all = [run["fewest_refusals_at_kl_target"] for run in full_runs]
        median = statistics.median(100 if value is None else value for value in fewest_all)
        lines.append(
            f"- **Equal time, median of {len(full_runs)} seeds**: {median:g}/100 refusals at KL ≤ {KL_TARGET} "
            f"(target ≤ {REFUSALS_TARGET}/100: {'met' if median <= REFUSALS_TARGET else 'missed'})."
        )
    runs_with_logs = [run for run in [*trials, *timed] if run["chosen"] is not None]
    lines += (
        []
        if not runs_with_logs
        else [
            "",
            "The trial each run chose (default rule) and its refusals on the bundled held-out harmful prompts (never "
            "used for directions or the search; an easier set: see the section above):",
            "",
            "| run | chosen trial | refusals in the search | KL | held-out refusals | difference |",
            "|---|---:|---:|---:|---:|---:|",
        ]
    )
    for run in runs_with_logs:
        chosen = run["chosen"]
        lines.append(
            f"| {run['label']} | {chosen['trial']} | {chosen['refusals']}/100 | {chosen['kl']:.3f} | "
            f"{chosen['heldout']}/100 (original {chosen['original_heldout']}) | {chosen['heldout'] - chosen['refusals']:+d} |"
        )
    lines += ["", "Reproduce: `python bench/seed_fronts.py " + summary["command"] + "`."]
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7.5, 5))
    front = summary["reference"]["front"]
    axis.step([p[0] for p in front], [p[1] for p in front], where="post", color="black", lw=2, label="reference (30 trials)")
    for run in summary["trials"]:
        front = run["front"]
        axis.step([p[0] for p in front], [p[1] for p in front], where="post", alpha=0.7, label=f"ours, seed {run['seed']} (30)")
    for run in summary["timed"]:
        front = run["front"]
        axis.step(
            [p[0] for p in front], [p[1] for p in front], where="post", lw=2, ls="--", label=f"ours, {run['trials']} trials"
        )
    axis.set_xlabel("refusals /100 (rules)")
    axis.set_ylabel("KL divergence")
    axis.set_xlim(0, 60)
    axis.set_ylim(0, 0.25)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", nargs="+", required=True, help="results files of 30-trial runs (one per seed)")
    parser.add_argument("--timed", nargs="*", default=[], help="results files of runs with a time budget")
    parser.add_argument(
        "--name", default="seeds", help="names the outputs: seed-fronts.json for 'seeds', else seed-fronts-NAME.json"
    )
    parser.add_argument(
        "--title",
        default="The model we hand out: our search over three seeds, and with more time (default judge)",
        help="the section's heading",
    )
    args = parser.parse_args()
    trials = [our_run(RESULTS / name) for name in args.trials]
    reference_wall = json.loads(REFERENCE_RESULTS.read_text())["wall_s"]
    timed = [our_run(RESULTS / name, budget_s=reference_wall) for name in args.timed]
    summary = summarize(trials, timed, reference_points())
    named = [] if args.name == "seeds" else ["--name", args.name, "--title", f"'{args.title}'"]
    summary["command"] = " ".join(["--trials", *args.trials] + (["--timed", *args.timed] if args.timed else []) + named)
    suffix = "" if args.name == "seeds" else f"-{args.name}"
    (RESULTS / f"seed-fronts{suffix}.json").write_text(json.dumps(summary, indent=2))
    plot(summary, RESULTS / f"fronts-{args.name}.png")
    section = markdown(summary, args.title)
    update_benchmarks_md(section, args.name)
    print(section)


if __name__ == "__main__":
    main()
