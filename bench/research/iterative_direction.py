"""A screening at fixed parameters: a second direction read from the ablated model (iterative ablation).

The refusals that survive a low-KL trial on the benchmark model are mostly requests to write malicious
code (bench/research/trial_responses.py), and a direction of that topic read from the original model does not
remove them (bench/research/cluster_direction.py). This script reads the second direction where they survive:
with a stored trial's ablation applied, the training harmful prompts are answered and judged (the
search's judge, 100-token responses with its early verdicts) and their residuals read again. Two
candidates per residual position j, each made orthonormal to r_j and ablated beside it as a
two-direction subspace [r_j, v_j'] with the trial's kernel weights:

    survivors: v_j = normalize(mean_{still refused} h_j - mean_{now answered} h_j)   (ablated model)
    re-read:   v_j = normalize(mean_harmful h_j - mean_harmless h_j)                  (ablated model)

Each trial is scored with r alone (the pair [r, 0]: a zero row ablates nothing) and with each pair.
With --second-weights a1,a2,..., each pair is also scored with its second row at a times the kernel
weight (the projector r r^T + a v v^T; a = 1 is the subspace). The candidates of a trial are kept in
bench/work/iterative/ and read from there when the script runs again.

    python -m bench.research.iterative_direction bench/results/20261203-140005.json 385,141
    python -m bench.research.iterative_direction bench/results/20261203-140005.json 385 --second-weights 0.25,0.5

Writes bench/results/iterative-direction.json (iterative-direction-weights.json with --second-weights);
prints one line per trial and variant.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from bench.harness.models import prepare_model
from bench.harness.paths import RESULTS, WORK
from bench.harness.tools import REFERENCE_MARKERS, our_command, score_with_subspace, stored_trial_parameters
from heretic.ablation.kernels import interpolate_subspace
from heretic.cli import settings_from_argv
from heretic.directions import orthonormal_rows, refusal_directions
from heretic.scoring.evaluator import Evaluator
from heretic.session import Session, collect_residuals, prepare


@contextlib.contextmanager
def second_row_weight(alpha: float) -> Iterator[None]:
    """Ablate a two-row subspace [r, v] with alpha times the kernel weight along v: its interpolated
    orthonormal rows become [r, sqrt(alpha) v], so the kernels' V^T V is r r^T + alpha v v^T."""

    def scaled(bases: torch.Tensor, index: float) -> torch.Tensor:
        rows = interpolate_subspace(bases, index)  # (2, hidden), orthonormal
        return torch.stack([rows[0], rows[1] * alpha**0.5])

    with mock.patch("heretic.ablation.parameters.interpolate_subspace", scaled):
        yield


def second_directions(session: Session, params: dict[str, Any], alone: torch.Tensor) -> tuple[dict[str, torch.Tensor], int]:
    """The candidate second directions (positions, hidden) read with the trial's ablation applied, and how
    many training harmful prompts that ablation still refuses."""
    train = session.prompt_sets["harmful"]
    session.ablator.subspace = alone
    session.ablator.apply(stored_trial_parameters(session, params), session.directions)
    judged = Evaluator(session.engine, session.evaluator.judge, train, [], session.settings.max_response_length)
    verdicts = judged.count_refusals().verdicts
    assert verdicts is not None
    residuals = collect_residuals(session.settings, session.engine, session.loaded, session.prompt_sets)
    session.ablator.reset()
    refused = torch.tensor(verdicts)
    harmful = residuals["harmful"]  # (prompts, positions, hidden), the ablated model's
    candidates = {
        "survivors": refusal_directions(harmful[refused], harmful[~refused], orthogonalize=False),
        "re-read": refusal_directions(harmful, residuals["harmless"], session.settings.orthogonalize_direction),
    }
    return candidates, int(refused.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="a run_bench results file whose trials have parameters")
    parser.add_argument("trials", help="trial numbers, comma-separated")
    parser.add_argument("--second-weights", default="1", help="the second row's weights, times the kernel's (comma-separated)")
    args = parser.parse_args()
    alphas = [float(a) for a in args.second_weights.split(",")]
    data = json.loads(args.results.read_text())
    ((_, tool),) = data["tools"].items()
    stored = {trial["number"]: trial for trial in tool["trials"]}
    argv = our_command(data["settings"], prepare_model(), REFERENCE_MARKERS, ["--checkpoint-dir", str(WORK / "iterative")])
    # Rank 2 sizes the adapters for a two-row subspace.
    session = prepare(settings_from_argv([*argv[1:], "--judge", "rules"]), interactive=False, subspace_rank=2)
    r = session.directions  # (positions, hidden)
    alone = torch.stack([r, torch.zeros_like(r)], dim=1)
    rows = []
    for number in (int(n) for n in args.trials.split(",")):
        params = stored[number]["params"]
        cache = WORK / "iterative" / f"candidates-{args.results.stem}-{number}.pt"
        if cache.is_file():
            candidates, still_refused = torch.load(cache)
        else:
            candidates, still_refused = second_directions(session, params, alone)
            torch.save((candidates, still_refused), cache)
        row: dict[str, Any] = {
            "trial": number,
            "training_refused": still_refused,
            "r": score_with_subspace(session, params, alone),
        }
        print(f"trial {number}: {still_refused} of {len(session.prompt_sets['harmful'])} training prompts still refused")
        for name, v in candidates.items():
            pair = torch.stack([orthonormal_rows(torch.stack([r[j], v[j]])) for j in range(r.shape[0])])  # (positions, 2, hidden)
            row[f"{name}_cosines"] = [round(float(x), 3) for x in (r * v).sum(dim=-1)]
            for alpha in alphas:
                with second_row_weight(alpha):
                    row[f"r+{name}" + (f"x{alpha:g}" if alpha != 1 else "")] = score_with_subspace(session, params, pair)
        rows.append(row)
        for variant in (key for key in row if key == "r" or key.startswith("r+")):
            result = row[variant]
            print(f"trial {number} {variant:>16}: {result['refusals']:>3} refusals, KL {result['kl']:.4f}", flush=True)
    out = RESULTS / ("iterative-direction.json" if alphas == [1.0] else "iterative-direction-weights.json")
    out.write_text(json.dumps({"source": args.results.name, "rows": rows}, indent=1))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
