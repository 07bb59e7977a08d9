"""A screening at fixed parameters: a second direction for one cluster of harmful prompts.

On the benchmark model the refusals that survive low-KL trials are mostly requests to write malicious
code (bench/research/trial_responses.py). This script tests whether their own direction removes them: the
refusal direction of the training prompts that ask for code, tools or websites (a keyword match),
c_j = normalize(mean_cluster_j - mean_harmless_j), is made orthonormal to the direction of all
prompts r_j and ablated beside it, as a two-direction subspace [r_j, c_j'] with the same kernel
weights, for stored trials of a run. Each trial is scored with r alone and with the pair.

    python -m bench.research.cluster_direction bench/results/20261203-140005.json 385,141

Writes bench/results/cluster-direction.json; prints one line per trial and variant.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from bench.harness.models import prepare_model
from bench.harness.paths import RESULTS, WORK
from bench.harness.tools import REFERENCE_MARKERS, our_command, score_with_subspace
from heretic.cli import settings_from_argv
from heretic.directions import orthonormal_rows, refusal_directions
from heretic.session import collect_residuals, prepare

# Training prompts that ask for something to be built in software.
CODE = re.compile(r"\b(script|program|code|software|malware|virus|botnet|hack\w*|website|app|algorithm|tool)\b", re.IGNORECASE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="a run_bench results file whose trials have parameters")
    parser.add_argument("trials", help="trial numbers, comma-separated")
    args = parser.parse_args()
    data = json.loads(args.results.read_text())
    ((_, tool),) = data["tools"].items()
    stored = {trial["number"]: trial for trial in tool["trials"]}
    argv = our_command(data["settings"], prepare_model(), REFERENCE_MARKERS, ["--checkpoint-dir", str(WORK / "cluster")])
    # Rank 2 sizes the adapters for a two-row subspace; r alone is the pair [r, 0] (a zero row ablates nothing).
    session = prepare(settings_from_argv([*argv[1:], "--judge", "rules"]), interactive=False, subspace_rank=2)
    cluster = [prompt for prompt in session.prompt_sets["harmful"] if CODE.search(prompt.user)]
    residuals = collect_residuals(
        session.settings, session.engine, session.loaded, {"harmful": cluster, "harmless": session.prompt_sets["harmless"]}
    )
    r = session.directions  # (positions, hidden)
    c = refusal_directions(residuals["harmful"], residuals["harmless"], session.settings.orthogonalize_direction)
    alone = torch.stack([r, torch.zeros_like(r)], dim=1)
    pair = torch.stack([orthonormal_rows(torch.stack([r[j], c[j]])) for j in range(r.shape[0])])  # (positions, 2, hidden)
    cosines = [round(float(x), 3) for x in (r * c).sum(dim=-1)]
    print(f"cluster: {len(cluster)} of {len(session.prompt_sets['harmful'])} training prompts; cos(r, c) by position: {cosines}")
    rows = []
    for number in (int(n) for n in args.trials.split(",")):
        row = {"trial": number, "r": score_with_subspace(session, stored[number]["params"], alone)}
        row["r+cluster"] = score_with_subspace(session, stored[number]["params"], pair)
        rows.append(row)
        for variant in ("r", "r+cluster"):
            result = row[variant]
            print(f"trial {number} {variant:>9}: {result['refusals']:>3} refusals, KL {result['kl']:.4f}", flush=True)
    out = RESULTS / "cluster-direction.json"
    out.write_text(
        json.dumps({"source": args.results.name, "cluster_prompts": len(cluster), "cosines": cosines, "rows": rows}, indent=1)
    )
    print(f"written: {out}")


if __name__ == "__main__":
    main()
