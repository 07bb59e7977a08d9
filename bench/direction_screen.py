"""A screening at fixed parameters: the same stored trials scored with each kind of refusal direction.

For the front trials of a stored run of our search, the ablation parameters stay as the search chose
them and only the directions change: the difference of means (the run's own), concept-cleaned
directions at several ridge strengths (and without the sensitive-topics atom), the learned direction,
and the two-direction subspace (--subspace-rank 2). A kind of direction worth a full search lowers the
refusals of these trials at a similar KL, or the KL at similar refusals.

    python -m bench.direction_screen bench/results/20261203-061547.json --model demo --no-sensitive
    python -m bench.direction_screen bench/work/ours-1.5b-mean-42 --model 1.5b --methods mean,clean,learned,subspace --ridges 0.1

The stored run is a run_bench results file, or the folder of a run_bench run under bench/work (finished
or not: its completed trials are read from its checkpoint journal).

Writes bench/results/direction-screen-MODEL.json (and, score by score, a .partial.json from which an
interrupted screening resumes); prints one line per trial and kind of direction. The table goes to the
"direction-screen-MODEL" section of docs/research/2026-12-07-direction-kinds.md; `--table` only rewrites it.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from bench.harness.machine import run_record
from bench.harness.models import MODELS
from bench.harness.paths import RESULTS, ROOT, WORK
from bench.harness.publish import update_section
from bench.harness.tools import front_trials, score_with_subspace, stored_run, stored_trial_parameters
from heretic.cli import settings_from_argv
from heretic.config import DirectionMethod
from heretic.directions import subspace_bases
from heretic.directions.concepts import clean_directions, concept_atoms, concept_prompts
from heretic.model.architecture import find_layers, text_config
from heretic.session import Session, collect_residuals, compute_directions, prepare, read_residuals
from heretic.ui import ProgressBars

RIDGES = "0.01,0.1,1"
NOTE = ROOT / "docs" / "research" / "2026-12-07-direction-kinds.md"


def score(session: Session, params: dict[str, Any], directions: torch.Tensor) -> dict[str, Any]:
    """Refusals and KL of a stored trial's ablation along `directions` (positions, hidden), or of a subspace
    (positions, 2, hidden) in a session of --subspace-rank 2 (where a direction d alone is the pair [d, 0]:
    a zero row ablates nothing)."""
    if directions.dim() == 3:
        result = score_with_subspace(session, params, directions)
        return {"refusals": result["refusals"], "kl": result["kl"]}
    session.ablator.apply(stored_trial_parameters(session, params), directions)
    kl = session.evaluator.kl()
    count = session.evaluator.count_refusals()
    session.ablator.reset()
    return {"refusals": count.refusals, "kl": kl}


def clean_variants(
    session: Session, residuals: dict[str, torch.Tensor], ridges: list[float], no_sensitive: bool
) -> dict[str, torch.Tensor]:
    """Concept-cleaned directions at each ridge, and (`no_sensitive`) at 0.1 without the sensitive-topics atom."""
    settings, engine, loaded, mean = session.settings, session.engine, session.loaded, session.directions
    harmless = residuals["harmless"].double().mean(dim=0)
    _, layers = find_layers(loaded.model, int(text_config(loaded.model.config).num_hidden_layers))
    concepts = concept_prompts(settings.concept_atoms, settings.system_prompt)
    with ProgressBars() as bars:
        means = {
            name: read_residuals(settings, engine, list(layers), prompts, bars, name).double().mean(dim=0)
            for name, prompts in concepts.items()
        }
    atoms = concept_atoms(torch.stack(list(means.values())), harmless)
    variants = {f"clean-{ridge:g}": clean_directions(mean, atoms, ridge) for ridge in ridges}
    if no_sensitive:
        kept = [i for i, name in enumerate(means) if name != "sensitive"]
        variants["clean-0.1-no-sensitive"] = clean_directions(mean, atoms[:, kept], 0.1)
    return variants


def subspace_variant(session: Session, residuals: dict[str, torch.Tensor]) -> torch.Tensor:
    """The two-direction subspace of --subspace-rank 2 (positions, 2, hidden): r and the top principal
    component of the paired harmful - harmless differences orthogonal to it."""
    return subspace_bases(residuals["harmful"], residuals["harmless"], session.directions, 2)


def learned_variant(session: Session, residuals: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    settings = session.settings.model_copy(update={"direction_method": DirectionMethod.learned})
    started = time.monotonic()
    directions = compute_directions(settings, session.engine, session.loaded, session.prompt_sets, residuals)
    print(f"learned direction: {time.monotonic() - started:.0f} s")
    return {"learned": directions}


def write_atomic(path: Path, text: str) -> None:
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(text)
    os.replace(staging, path)


def scored_before(partial: Path, summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The scores an interrupted screening of the same run and kinds of direction kept, keyed "trial/kind"."""
    if not partial.exists():
        return {}
    data = json.loads(partial.read_text())
    if any(data[key] != summary[key] for key in ("source", "model", "methods", "ridges", "no_sensitive")):
        return {}
    print(f"resuming from {partial.name}")
    return {
        f"{row['trial']}/{name}": value for row in data["rows"] for name, value in row.items() if name not in ("trial", "stored")
    }


def table(data: dict[str, Any]) -> str:
    """The screening as markdown: one row per trial, one column per kind of direction (refusals / KL)."""
    names = [name for name in data["rows"][0] if name not in ("trial", "stored")]
    lines = [
        f"### Kinds of direction at fixed parameters, {MODELS[data['model']]}",
        "",
        "The front trials of a stored search with the current default (difference of means), each scored with its "
        "parameters unchanged and only the directions replaced: refusals/100 and KL. A screening, not a search.",
        "",
        "| trial | " + " | ".join(names) + " |",
        "|---:" + "|---" * len(names) + "|",
    ]
    for row in data["rows"]:
        cells = [f"{row[name]['refusals']} / {row[name]['kl']:.3f}" for name in names]
        lines.append(f"| {row['trial']} | " + " | ".join(cells) + " |")
    cosines = ", ".join(
        f"{name} {min(values[1:]):.2f}" for name, values in data["cosines"].items() if name not in ("mean", "subspace-2")
    )
    lines += ["", f"Lowest cosine with the difference of means over the layers: {cosines}."]
    return "\n".join(lines)


def publish(data: dict[str, Any]) -> None:
    """The "direction-screen-MODEL" section of the research note on kinds of direction, stamped with the screening's date, CPU and commit."""
    source = data["source"] if "/" in data["source"] else f"bench/results/{data['source']}"
    command = (
        f"python -m bench.direction_screen {source} --model {data['model']} "
        f"--trials {len(data['rows'])} --methods {data['methods']}"
    )
    if data.get("ridges", RIDGES) != RIDGES:
        command += f" --ridges {data['ridges']}"
    if data.get("no_sensitive", True):
        command += " --no-sensitive"
    update_section(table(data), f"direction-screen-{data['model']}", data, command, path=NOTE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="a run_bench results file of our search, or a run's folder in bench/work")
    parser.add_argument("--model", choices=sorted(MODELS), default="demo")
    parser.add_argument("--trials", type=int, default=8, help="front trials scored (fewest refusals first)")
    parser.add_argument("--methods", default="mean,clean", help="comma-separated: mean, clean, learned, subspace")
    parser.add_argument("--ridges", default=RIDGES, help="comma-separated ridge strengths of the clean directions")
    parser.add_argument("--no-sensitive", action="store_true", help="also clean at ridge 0.1 without the sensitive atom")
    parser.add_argument("--batch-size", type=int, default=32, help="fixed, so that a busy machine does not choose it")
    parser.add_argument("--table", action="store_true", help="only rewrite the BENCHMARKS.md section from the results")
    args = parser.parse_args()
    output = RESULTS / f"direction-screen-{args.model}.json"
    if args.table:
        publish(json.loads(output.read_text()))
        return
    stored, argv = stored_run(args.results, args.model, WORK / "screen")
    trials = front_trials(stored, args.trials)
    methods = args.methods.split(",")
    options = ["--judge", "rules", "--batch-size", str(args.batch_size)]
    options += ["--subspace-rank", "2"] if "subspace" in methods else []
    session = prepare(settings_from_argv([*argv[1:], *options]), interactive=False)
    # The original's residuals, read once for every kind of direction (the session keeps those it computed).
    residuals = session.residuals or collect_residuals(session.settings, session.engine, session.loaded, session.prompt_sets)
    variants = {"mean": session.directions}
    if "clean" in methods:
        ridges = [float(ridge) for ridge in args.ridges.split(",")]
        variants.update(clean_variants(session, residuals, ridges, args.no_sensitive))
    if "learned" in methods:
        variants.update(learned_variant(session, residuals))
    cosines = {name: [round(float(x), 3) for x in (d * session.directions).sum(dim=-1)] for name, d in variants.items()}
    if "subspace" in methods:
        variants = {name: torch.stack([d, torch.zeros_like(d)], dim=1) for name, d in variants.items()}
        variants["subspace-2"] = subspace_variant(session, residuals)
        cosines["subspace-2"] = cosines["mean"]
    summary = {
        "source": str(args.results.resolve().relative_to(ROOT)) if args.results.is_dir() else args.results.name,
        "model": args.model,
        "methods": args.methods,
        "ridges": args.ridges,
        "no_sensitive": args.no_sensitive,
        **run_record(),  # date, cpu_flags, commit
        "cosines": cosines,
        "rows": [],
    }
    # Each score is kept as soon as it is made, so an interrupted screening resumes where it stopped.
    partial = output.with_suffix(".partial.json")
    done = scored_before(partial, summary)
    for trial in trials:
        row: dict[str, Any] = {"trial": trial["number"], "stored": {"refusals": trial["refusals"], "kl": trial["kl"]}}
        summary["rows"].append(row)
        for name, directions in variants.items():
            key = f"{trial['number']}/{name}"
            row[name] = done[key] if key in done else score(session, trial["params"], directions)
            write_atomic(partial, json.dumps(summary, indent=1))
            print(
                f"trial {trial['number']:>4} {name:<24} {row[name]['refusals']:>3} refusals  KL {row[name]['kl']:.4f}", flush=True
            )
    write_atomic(output, json.dumps(summary, indent=1))
    partial.unlink()
    publish(summary)
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
