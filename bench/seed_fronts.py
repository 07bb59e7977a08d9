"""Issue targets of the model we hand out, over several seeds of our search: equal trials and equal time.

Reads run_bench results of our search under the default judge (`--judge rules`) and the reference's
trials replayed and counted by the same judge (bench/research/rescore_fronts.py), and checks:

- equal trials: at every refusal cap from 10 to 40, the median over our seeds of the best KL within
  the cap is at most 0.7x the reference's best KL there (one replayed run of the reference; where the
  reference has no trial within a cap and we have one, we are better there);
- equal time (runs given a time budget with --search-minutes): the fewest refusals at KL <= 0.10
  (target: at most 5/100), and how much of the reference's wall time each run had.

    python -m bench.seed_fronts --trials RUN-42.json RUN-43.json RUN-44.json [--timed RUN.json] [--name NAME]
    python -m bench.seed_fronts --summary --name seeds-positions   # the section again, from a summary

Writes bench/results/seed-fronts-NAME.json (seed-fronts.json for the name 'seeds'), bench/results/fronts-NAME.png
and the "seeds" section of BENCHMARKS.md (another page and section with --doc and --marker: a note of
docs/research/). Our trials cut short as dominated have only a lower bound on their refusals and are left out
of the fronts (they are dominated by trials that are in them).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from bench.harness.metrics import KL_CAP, best_kl, fewest_refusals, hypervolume, median_best, pareto
from bench.harness.paths import BENCHMARKS, RESULTS
from bench.harness.publish import recorded, update_section
from bench.harness.runs import our_run

CAPS = list(range(10, 41))  # the refusal caps of the equal-trials target
SHOWN_CAPS = [10, 15, 20, 25, 30, 35, 40]
RATIO_TARGET = 0.7
KL_TARGET, REFUSALS_TARGET = 0.10, 5
REFERENCE_RESULTS = RESULTS / "reference-73baa3e6a27f.json"  # the reference's full run: its wall time


def reference_points() -> list[tuple[int, float]]:
    """The reference's 30 trials replayed, counted by rules (bench/research/rescore_fronts.py)."""
    rows = json.loads((RESULTS / "rescored-fronts.json").read_text())["tools"]["reference"]["rows"]
    return [(row["refusals"]["rules"], row["kl"]) for row in rows]


def verdict(ours: float | None, reference: float | None) -> tuple[float | None, bool]:
    """(ours / reference, whether the cap meets the target)."""
    if ours is None:
        return None, False
    if reference is None:
        return None, True  # only we reach the cap
    ratio = ours / reference
    return ratio, ratio <= RATIO_TARGET


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


def fronts_table(summary: dict[str, Any]) -> list[str]:
    """Each run's trials, time, hypervolume and best KL at the shown caps, the median of our seeds and its ratio."""
    trials, timed, caps = summary["trials"], summary["timed"], {row["cap"]: row for row in summary["caps"]}
    reference = summary["reference"]["points"]
    lines = [
        "| run | seed | trials | wall | median trial | hypervolume | "
        + " | ".join(f"best KL ≤ {cap}" for cap in SHOWN_CAPS)
        + " |",
        "|---|---:|---:|---:|---:|---:|" + "---:|" * len(SHOWN_CAPS),
        f"| reference (replayed) | 42 | 30 | {summary['reference_wall_s'] / 3600:.1f} h | — | {summary['reference']['hypervolume']:.1f} | "
        + " | ".join(fmt(best_kl(reference, cap)) for cap in SHOWN_CAPS)
        + " |",
    ]
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
    lines.append("| ours / reference | | | | | | " + " | ".join(ratio_cell(caps[cap]) for cap in SHOWN_CAPS) + " |")
    return lines


def ratio_cell(row: dict[str, Any]) -> str:
    if row["ratio"] is not None:
        return f"{row['ratio']:.2f}×"
    return "only ours" if row["ours_median"] is not None else "neither" if row["reference"] is None else "only ref."


def target_lines(summary: dict[str, Any]) -> list[str]:
    """The equal-trials target, and the equal-time target of each timed run (and of their median over three seeds)."""
    timed = summary["timed"]
    neither = [row["cap"] for row in summary["caps"] if row["ours_median"] is None and row["reference"] is None]
    missed = [row["cap"] for row in summary["caps"] if not row["met"] and row["cap"] not in neither]
    lines = [
        f"- **Equal trials (30)**: target ≤ {RATIO_TARGET}× the reference's best KL at every cap from 10 to 40 "
        f"(median of our seeds): **{'met' if not missed and not neither else 'missed'}**"
        + (f"; above {RATIO_TARGET}× at caps {compact(missed)}" if missed else "")
        + (f"; neither tool (our seeds' median) has a trial within {compact(neither)} refusals" if neither else "")
        + ".",
    ]
    for run in timed:
        fewest = run["fewest_refusals_at_kl_target"]
        full = run["share_of_reference_wall"] >= 0.999
        left_out = run["trials_run"] - run["trials"]
        lines.append(
            f"- **Equal time{'' if full else ', partly'}**: `{run['label']}` (seed {run['seed']}) finished "
            f"{run['trials']} trials in {run['wall_s'] / 60:.0f} min, {run['share_of_reference_wall']:.2f}× the "
            f"reference's wall time for its 30 trials ({summary['reference_wall_s'] / 3600:.1f} h)"
            + (f"; the {left_out} trials after that are left out" if left_out > 0 else "")
            + f". Fewest refusals at KL ≤ {KL_TARGET}: {fewest if fewest is not None else 'none'}/100 (target ≤ "
            f"{REFUSALS_TARGET}/100: {'met' if fewest is not None and fewest <= REFUSALS_TARGET else 'missed'})."
        )
    full_runs = [run for run in timed if run["share_of_reference_wall"] >= 0.999]
    if len(full_runs) >= 3:
        median = statistics.median(
            100 if run["fewest_refusals_at_kl_target"] is None else run["fewest_refusals_at_kl_target"] for run in full_runs
        )
        lines.append(
            f"- **Equal time, median of {len(full_runs)} seeds**: {median:g}/100 refusals at KL ≤ {KL_TARGET} "
            f"(target ≤ {REFUSALS_TARGET}/100: {'met' if median <= REFUSALS_TARGET else 'missed'})."
        )
    return lines


def chosen_table(runs: list[dict[str, Any]]) -> list[str]:
    """The trial each run chose and its held-out refusals (runs without a log in bench/runs are left out)."""
    runs_with_logs = [run for run in runs if run["chosen"] is not None]
    if not runs_with_logs:
        return []
    lines = [
        "",
        "The trial each run chose (default rule) and its refusals on the bundled held-out harmful prompts (never "
        "used for directions or the search; an easier set: see the section above):",
        "",
        "| run | chosen trial | refusals in the search | KL | held-out refusals | difference |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for run in runs_with_logs:
        chosen = run["chosen"]
        lines.append(
            f"| {run['label']} | {chosen['trial']} | {chosen['refusals']}/100 | {chosen['kl']:.3f} | "
            f"{chosen['heldout']}/100 (original {chosen['original_heldout']}) | {chosen['heldout'] - chosen['refusals']:+d} |"
        )
    return lines


def markdown(summary: dict[str, Any], title: str) -> str:
    intro = (
        "Our search under the default judge (`--judge rules`) at the side-by-side benchmark's settings (demo model, "
        "100 + 100 evaluation prompts, 100-token responses, 10 random start-up trials), against the reference's 30 "
        "trials replayed and counted by the same judge (one run of the reference: the section above). KL does not "
        "depend on the judge."
    )
    lines = [f"### {title}", "", intro, "", *fronts_table(summary), "", *target_lines(summary)]
    return "\n".join(lines + chosen_table([*summary["trials"], *summary["timed"]]))


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
    parser.add_argument("--trials", nargs="+", help="results files of 30-trial runs (one per seed)")
    parser.add_argument("--timed", nargs="*", default=[], help="results files of runs with a time budget")
    parser.add_argument(
        "--name",
        default="three-seeds",
        help="names the outputs: seed-fronts-NAME.json and fronts-NAME.png (seed-fronts.json for 'seeds')",
    )
    parser.add_argument("--title", default="Our search over three seeds (default judge)", help="the section's heading")
    parser.add_argument("--marker", default="seeds", help="the section of the page that is rewritten")
    parser.add_argument("--doc", type=Path, default=BENCHMARKS, help="the page: BENCHMARKS.md or a note of docs/research/")
    parser.add_argument(
        "--summary", action="store_true", help="measure nothing: rewrite the section from the summary file of --name"
    )
    args = parser.parse_args()
    output = RESULTS / ("seed-fronts.json" if args.name == "seeds" else f"seed-fronts-{args.name}.json")
    if args.summary:
        summary = json.loads(output.read_text())
    elif not args.trials:
        parser.error("--trials is needed unless --summary")
    else:
        trials = [our_run(RESULTS / name) for name in args.trials]
        reference_wall = json.loads(REFERENCE_RESULTS.read_text())["wall_s"]
        timed = [our_run(RESULTS / name, budget_s=reference_wall) for name in args.timed]
        summary = summarize(trials, timed, reference_points())
        named = ["--name", args.name, "--title", f"'{args.title}'"]
        summary["command"] = " ".join(["--trials", *args.trials] + (["--timed", *args.timed] if args.timed else []) + named)
        output.write_text(json.dumps(summary, indent=2))
        plot(summary, RESULTS / f"fronts-{args.name}.png")
    section = markdown(summary, args.title)
    runs = [json.loads((RESULTS / run["file"]).read_text())["settings"] for run in [*summary["trials"], *summary["timed"]]]
    update_section(section, args.marker, recorded(*runs), "python -m bench.seed_fronts " + summary["command"], args.doc)
    print(section)


if __name__ == "__main__":
    main()
