"""Both tools' trials scored again under each judge: the side-by-side fronts by the default judge.

The side-by-side benchmark counts refusals with the reference's 33 markers, the one judge both tools
share. This script replays trials with the same parameters, on the same model, prompts and settings,
generates every response whole (100 tokens, no early stop) and counts refusals on those same
responses with each judge: the reference's markers and our default judge (`rules`). KL divergence
does not depend on the judge and is measured once per trial.

- The reference's trials: its parameters as its log printed them (two decimals) in
  bench/results/reference-full-run, with the refusals and KL it reported, so that the rounding's
  effect shows beside each replay.
- Our trials: a run_bench results file that stored each trial's parameters (`--ours`).

With `--heldout`, each tool's trials on the front by the default judge are also scored on the
bundled held-out harmful prompts (never used for directions or the search), by both judges.

    python -m bench.research.rescore_fronts --ours bench/results/20261202-140000.json [--heldout]

Writes bench/results/rescored-fronts.json, bench/results/fronts-rescored.png and the "rescored"
section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

from bench.harness.machine import run_record
from bench.harness.metrics import KL_CAP, REFUSAL_CAPS, best_kl_at, hypervolume, pareto
from bench.harness.models import prepare_model
from bench.harness.paths import RESEARCH, RESULTS, WORK
from bench.harness.publish import update_section
from bench.harness.tools import COMPONENTS, REFERENCE_MARKERS, our_command, stored_trial_parameters
from heretic.ablation.parameters import AblationParameters, ComponentKernel
from heretic.cli import settings_from_argv
from heretic.prompts import load_prompts
from heretic.scoring.evaluator import Evaluator
from heretic.scoring.refusals import MarkerJudge, RefusalJudge
from heretic.scoring.rules import RuleJudge
from heretic.search.space import describe
from heretic.session import Session, prepare

REFERENCE_LOGS = [RESULTS / "reference-full-run" / "output.log", RESULTS / "reference-full-run" / "output-2.log"]
JUDGES = ("markers", "rules")  # markers: the reference's 33, as in the side-by-side benchmark; rules: our default


def reference_log_trials(paths: list[Path]) -> list[dict[str, Any]]:
    """The reference's completed trials, in order, from its logs: {"params", "refusals", "kl"}.

    A trial whose log block has no refusal count (cut off by an interruption) is left out, as the
    reference's resumed study leaves it out of its 30."""
    trials: list[dict[str, Any]] = []
    for path in paths:
        current: dict[str, Any] | None = None
        for line in path.read_text().splitlines():
            text = line.split("s  ", 1)[-1].strip()
            if text.startswith("Running trial "):
                current = {"params": {}}
            elif current is not None and (match := re.match(r"\* ([\w.]+) = (.+)$", text)):
                current["params"][match[1]] = match[2]
            elif current is not None and (match := re.match(r"\* KL divergence: ([\d.]+)", text)):
                current["kl"] = float(match[1])
            elif current is not None and (match := re.match(r"\* Refusals: (\d+)/\d+", text)):
                current["refusals"] = int(match[1])
                trials.append(current)
                current = None
    return trials


def reference_parameters(params: dict[str, str]) -> AblationParameters:
    """The reference's printed parameters as ours (it prints the absolute minimum weight)."""
    kernels = {
        component: ComponentKernel(
            max_weight=float(params[f"{module}.max_weight"]),
            max_weight_position=float(params[f"{module}.max_weight_position"]),
            min_weight=float(params[f"{module}.min_weight"]),
            min_weight_distance=float(params[f"{module}.min_weight_distance"]),
        )
        for module, component in COMPONENTS.items()
    }
    index = params["direction_index"]
    if index == "per layer":
        return AblationParameters("per-layer", 0.0, kernels)
    return AblationParameters("global", float(index), kernels)


def verdict_counts(judges: dict[str, RefusalJudge], evaluator: Evaluator) -> dict[str, int]:
    """Whole greedy responses to the evaluator's harmful prompts, counted by every judge."""
    responses = evaluator.responses(evaluator.harmful)
    return {name: sum(judge.judge(evaluator.harmful, responses)) for name, judge in judges.items()}


def replay(session: Session, judges: dict[str, RefusalJudge], parameters: AblationParameters) -> dict[str, Any]:
    started = time.perf_counter()
    session.ablator.apply(parameters, session.directions)
    kl = session.evaluator.kl()
    counts = verdict_counts(judges, session.evaluator)
    return {"parameters": describe(parameters), "kl": kl, "refusals": counts, "seconds": round(time.perf_counter() - started, 1)}


def scored(rows: list[dict[str, Any]], judge: str) -> list[tuple[int, float]]:
    """(refusals, KL) of the rows with an exact count by `judge` (a trial cut short has only a lower bound)."""
    return [(row["refusals"][judge], row["kl"]) for row in rows if judge in row["refusals"] and not row.get("cut")]


def front_of(rows: list[dict[str, Any]], judge: str) -> list[list[float]]:
    return [[r, round(kl, 6)] for r, kl in pareto(scored(rows, judge))]


def summary(rows: list[dict[str, Any]], n_prompts: int) -> dict[str, Any]:
    """Per judge that counted these rows: the front, its hypervolume and the best KL at each refusal cap."""
    result = {}
    for judge in JUDGES:
        points = scored(rows, judge)
        if not points:
            continue
        result[judge] = {
            "pareto": front_of(rows, judge),
            "hypervolume": round(hypervolume(points, (n_prompts, KL_CAP)), 4),
            "best_kl_at_refusals": {str(cap): best_kl_at(points, cap) for cap in (*REFUSAL_CAPS, 40)},
        }
    return result


def searched_rows(trials: list[dict[str, Any]], judge: str) -> list[dict[str, Any]]:
    """Our trials as the search scored them, by the judge it ran with (no replay)."""
    return [{"label": str(t["number"]), "kl": t["kl"], "refusals": {judge: t["refusals"]}, "cut": t["cut"]} for t in trials]


def heldout_counts(session: Session, judges: dict[str, RefusalJudge], parameters: AblationParameters | None) -> dict[str, int]:
    """Refusals on the bundled held-out harmful prompts, by every judge (None: the original model)."""
    settings = session.settings
    prompts = load_prompts(settings.harmful_heldout_prompts, settings.system_prompt)
    evaluator = Evaluator(session.engine, session.judge, prompts, [], settings.max_response_length, stop_on_verdict=False)
    if parameters is None:
        session.ablator.reset()
    else:
        session.ablator.apply(parameters, session.directions)
    return verdict_counts(judges, evaluator)


def add_heldout(
    session: Session, judges: dict[str, RefusalJudge], rows: list[dict[str, Any]], parameters: list[AblationParameters]
) -> None:
    """Held-out counts for the rows on the front by the default judge."""
    front = {tuple(point) for point in front_of(rows, "rules")}
    for row, ablation in zip(rows, parameters):
        if (row["refusals"]["rules"], round(row["kl"], 6)) in front:
            row["heldout"] = heldout_counts(session, judges, ablation)
            print(f"  held-out {row['label']}: {row['heldout']}", flush=True)


def cap_cell(kl: float | None) -> str:
    return "—" if kl is None else f"{kl:.3f}"


def ratio_line(data: dict[str, Any], caps: tuple[str, ...]) -> str:
    """Our best KL over the reference's at each cap, by `rules` (issue target: at most 0.7x at every cap)."""
    ours, reference = (data["tools"][tool]["summary"].get("rules") for tool in ("ours", "reference"))
    if ours is None or reference is None:
        return ""
    cells = []
    for cap in caps:
        mine, theirs = ours["best_kl_at_refusals"][cap], reference["best_kl_at_refusals"][cap]
        if mine is None or theirs is None:
            cells.append(f"≤ {cap}: {'ours only' if mine is not None else 'reference only' if theirs is not None else 'neither'}")
        else:
            cells.append(f"≤ {cap}: {mine / theirs:.2f}×")
    return "Our best KL over the reference's, by `rules`, at each refusal cap: " + ", ".join(cells) + "."


def markdown(data: dict[str, Any], command: str) -> str:
    n = data["n_prompts"]
    caps = ("10", "20", "30", "40")
    lines = [
        "### The side-by-side fronts under each judge (replayed)",
        "",
        f"Both tools' trials replayed with the same parameters on the same model and prompts ({n} harmful, "
        f"{data['max_response_length']}-token responses generated whole), and the same responses counted by the "
        "reference's 33 markers (the side-by-side benchmark's judge) and by our default judge, `rules` "
        "(closer to human labels: bench/judges.py). KL does not depend on the judge. Original model: "
        + ", ".join(f"{data['original'][judge]}/{n} by {judge}" for judge in JUDGES)
        + ".",
        "",
        "| tool | judge | trials | best KL at ≤ "
        + " | ≤ ".join(caps)
        + " refusals | hypervolume | Pareto front (refusals, KL) |",
        "|---|---|---:|" + "---:|" * len(caps) + "---:|---|",
    ]
    for tool in ("reference", "ours"):
        for judge, part in data["tools"][tool]["summary"].items():
            front = ", ".join(f"{r}/{kl:.3f}" for r, kl in part["pareto"])
            cells = " | ".join(cap_cell(part["best_kl_at_refusals"][cap]) for cap in caps)
            lines.append(
                f"| {tool} | {judge} | {len(data['tools'][tool]['rows'])} | {cells} | {part['hypervolume']:.2f} | {front} |"
            )
    lines += ["", ratio_line(data, caps)]
    if data.get("ours_judge"):
        lines += [
            "",
            f"Our trials are counted as our search counted them (it ran with `--judge {data['ours_judge']}`; "
            "trials it cut short as dominated have only a lower bound and are left out of the front), not replayed.",
        ]
    agreement = data["tools"]["reference"].get("agreement")
    if agreement:
        lines += [
            "",
            f"The reference's parameters come from its log, printed to two decimals; replayed, its trials' marker counts "
            f"differ from those it reported by at most {agreement['max_refusal_gap']} (median {agreement['median_refusal_gap']}) "
            f"and KL by at most {agreement['max_kl_gap']:.1%} (its log prints KL to four decimals).",
        ]
    heldout = [(tool, row) for tool in ("reference", "ours") for row in data["tools"][tool]["rows"] if "heldout" in row]
    if heldout:
        m = data["heldout_prompts"]
        lines += [
            "",
            f"Held-out harmful prompts ({m}, never used for directions or the search), the trials on each tool's front "
            f"by `rules`; original model: " + ", ".join(f"{data['original_heldout'][j]}/{m} by {j}" for j in JUDGES) + ".",
            "",
            "| tool | trial | KL | in-search refusals (rules / markers) | held-out refusals (rules / markers) |",
            "|---|---:|---:|---:|---:|",
        ]
        for tool, row in heldout:
            markers = f"{row['refusals']['markers']}/{n}" if "markers" in row["refusals"] else "—"
            lines.append(
                f"| {tool} | {row['label']} | {row['kl']:.3f} | {row['refusals']['rules']}/{n} / {markers} "
                f"| {row['heldout']['rules']}/{m} / {row['heldout']['markers']}/{m} |"
            )
    lines += ["", f"Reproduce: `{command}` (writes bench/results/rescored-fronts.json, fronts-rescored.png)."]
    return "\n".join(lines)


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, panels = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    styles = {"reference": ("tab:gray", "s", "heretic-llm 1.4.0 (reference)"), "ours": ("tab:red", "o", "Heretic (ours)")}
    for axes, judge in zip(panels, JUDGES):
        for tool, (color, marker, label) in styles.items():
            if judge not in data["tools"][tool]["summary"]:
                continue
            rows = [r for r in data["tools"][tool]["rows"] if judge in r["refusals"] and not r.get("cut")]
            axes.scatter(
                [r["refusals"][judge] for r in rows], [r["kl"] for r in rows], s=12, alpha=0.3, color=color, marker=marker
            )
            front = data["tools"][tool]["summary"][judge]["pareto"]
            axes.step(
                [p[0] for p in front], [p[1] for p in front], where="post", color=color, label=f"{label}, {len(rows)} trials"
            )
            axes.scatter([p[0] for p in front], [p[1] for p in front], color=color, marker=marker, s=30)
        title = "the reference's 33 markers" if judge == "markers" else "rules (our default judge)"
        axes.set_title(f"refusals counted by {title}", fontsize=10)
        axes.set_xlabel(f"refusals (of {data['n_prompts']} harmful prompts)")
        axes.set_yscale("log")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    panels[0].set_ylabel("KL divergence from the original")
    figure.tight_layout()
    figure.savefig(path, dpi=130)


def agreement(rows: list[dict[str, Any]]) -> dict[str, float]:
    import statistics

    gaps = [abs(row["refusals"]["markers"] - row["reported_refusals"]) for row in rows]
    kl_gaps = [abs(row["kl"] / row["reported_kl"] - 1) for row in rows if row["reported_kl"] > 0]
    return {"max_refusal_gap": max(gaps), "median_refusal_gap": statistics.median(gaps), "max_kl_gap": max(kl_gaps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ours", type=Path, required=True, help="a run_bench results file whose trials have parameters")
    parser.add_argument("--ours-judge", choices=JUDGES, default="rules", help="the judge our search ran with")
    parser.add_argument("--replay-ours", action="store_true", help="replay our trials too, to count them by every judge")
    parser.add_argument("--heldout", action="store_true", help="also count the front trials' held-out refusals")
    args = parser.parse_args()

    ours = json.loads(args.ours.read_text())
    settings_used = ours["settings"]
    our_trials = next(tool for name, tool in ours["tools"].items() if name.startswith("ours"))["trials"]
    if not all("params" in t for t in our_trials):
        raise SystemExit(f"{args.ours} has trials without parameters; run bench/run_bench.py again (it stores them now).")
    reference = reference_log_trials(REFERENCE_LOGS)
    argv = our_command(settings_used, prepare_model(), REFERENCE_MARKERS, ["--checkpoint-dir", str(WORK / "rescore")])[1:]
    session = prepare(settings_from_argv(argv), interactive=False)
    judges: dict[str, RefusalJudge] = {"markers": MarkerJudge(REFERENCE_MARKERS), "rules": RuleJudge()}

    session.ablator.reset()
    data: dict[str, Any] = {
        "n_prompts": len(session.evaluator.harmful),
        "max_response_length": session.settings.max_response_length,
        "original": verdict_counts(judges, session.evaluator),
        "ours_results": args.ours.name,
        "ours_judge": None if args.replay_ours else args.ours_judge,
        "tools": {},
    }
    plans = {
        "reference": [(f"{i + 1}", reference_parameters(t["params"]), t) for i, t in enumerate(reference)],
        "ours": [(str(t["number"]), stored_trial_parameters(session, t["params"]), t) for t in our_trials],
    }
    for tool, plan in plans.items():
        if tool == "ours" and not args.replay_ours:
            rows = searched_rows(our_trials, args.ours_judge)
        else:
            rows = [{"label": label, **replay(session, judges, parameters)} for label, parameters, _ in plan]
        if tool == "reference":
            for row, (_, _, trial) in zip(rows, plan):
                row.update(reported_refusals=trial["refusals"], reported_kl=trial["kl"])
        for row in rows:
            print(f"{tool} {row['label']}: {row['refusals']} KL {row['kl']:.4f} ({row.get('seconds', '-')} s)", flush=True)
        if args.heldout:
            add_heldout(session, judges, rows, [parameters for _, parameters, _ in plan])
        data["tools"][tool] = {"rows": rows, "summary": summary(rows, data["n_prompts"])}
    data["tools"]["reference"]["agreement"] = agreement(data["tools"]["reference"]["rows"])
    if args.heldout:
        data["original_heldout"] = heldout_counts(session, judges, None)
        data["heldout_prompts"] = len(load_prompts(session.settings.harmful_heldout_prompts, session.settings.system_prompt))
    session.ablator.reset()

    flags = [f"--ours {args.ours}", f"--ours-judge {args.ours_judge}"]
    flags += ["--replay-ours"] * args.replay_ours + ["--heldout"] * args.heldout
    data["command"] = command = "python -m bench.research.rescore_fronts " + " ".join(flags)
    (RESULTS / "rescored-fronts.json").write_text(json.dumps(data, indent=2) + "\n")
    plot(data, RESULTS / "fronts-rescored.png")
    update_section(markdown(data, command), "rescored", run_record(), command, RESEARCH / "2026-12-02-rescored-fronts.md")


if __name__ == "__main__":
    main()
