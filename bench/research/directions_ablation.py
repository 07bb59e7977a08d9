"""Screening of direction and component variants at FIXED ablation parameters (not a search).

Loads the demo model (Qwen2.5-Coder-0.5B-Instruct Q4_K_M) with the demo's quick preset once, computes
the refusal directions once per variant, and scores a fixed set of good ablation parameters (trials of
the reference's Pareto front on the side-by-side benchmark, which our tool scores alike) under each:

- where the directions are read: the last prompt token ("today": the default when it was recorded), the "assistant" token (-2), the
  end-of-turn token (-5), the mean of the chat template's last five tokens (-5..-1);
- subspace ablation: k = 2, 3 directions (the direction plus principal components of the paired
  harmful - harmless differences);
- the MLP's ablation switched off;
- each with KL over the first response token and over the first 4 (teacher-forced greedy
  continuation of the original), and with refusals on the held-out harmful prompts.

Refusals by the markers judge, 48-token responses (as the demo). Deterministic counts; the times
are only indicative on a shared machine.

    python -m bench.research.directions_ablation            # ~25 min on 2 busy cores

Writes bench/results/directions_ablation.json (after every row) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.harness.machine import machine
from bench.harness.paths import RESULTS
from heretic.ablation.adapters import Ablator
from heretic.ablation.parameters import AblationParameters, ComponentKernel
from heretic.config import Settings
from heretic.demo import apply_demo_preset
from heretic.directions import refusal_directions, subspace_bases
from heretic.model.architecture import build_architecture_map, find_layers, text_config
from heretic.prompts import load_prompts
from heretic.scoring.evaluator import Evaluator
from heretic.session import choose_response_prefix, load, load_prompt_sets, make_engine, make_judge

# Reference Pareto-front trials of the side-by-side benchmark (bench/results/replay-reference.json):
# (trial, parameters as search.space.describe writes them).
PARAMETER_SETS = [
    (4, "dir per-layer, attn 1.16@18.8→0.22±13.4, mlp 1.34@22.4→1.20±8.7"),
    (21, "dir per-layer, attn 1.47@19.4→0.33±9.0, mlp 1.26@20.6→0.41±4.2"),
    (25, "dir 13.2, attn 1.32@18.4→0.55±8.2, mlp 1.15@21.8→0.23±3.6"),
    (26, "dir per-layer, attn 1.29@16.8→0.03±11.1, mlp 1.35@20.3→0.13±1.3"),
]
# name -> (read positions, subspace rank, MLP ablated)
VARIANTS: dict[str, tuple[list[int], int, bool]] = {
    "last token (today)": ([-1], 1, True),
    "position -2": ([-2], 1, True),
    "position -5": ([-5], 1, True),
    "mean of -5..-1": ([-5, -4, -3, -2, -1], 1, True),
    "subspace k=2": ([-1], 2, True),
    "subspace k=3": ([-1], 3, True),
    "MLP off": ([-1], 1, False),
}
KERNEL = re.compile(r"(\w+) ([\d.]+)@([\d.]+)→([\d.]+)±([\d.]+)")


def parse_parameters(text: str) -> AblationParameters:
    """AblationParameters from describe()'s one-line form."""
    head = text.split(",")[0]
    scope, index = ("per-layer", 0.0) if "per-layer" in head else ("global", float(head.split()[1]))
    kernels = {m[1]: ComponentKernel(float(m[2]), float(m[3]), float(m[4]), float(m[5])) for m in KERNEL.finditer(text)}
    return AblationParameters(scope, index, kernels)


def without_mlp(parameters: AblationParameters) -> AblationParameters:
    kernels = {name: kernel for name, kernel in parameters.kernels.items() if name != "mlp"}
    return AblationParameters(parameters.direction_scope, parameters.direction_index, kernels)


def variant_directions(
    engine: Any, loaded: Any, prompt_sets: dict, settings: Settings, chosen: dict[str, tuple[list[int], int, bool]]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(directions, bases or None-like empty) per variant, from two residual passes."""
    config = text_config(loaded.model.config)
    _, layers = find_layers(loaded.model, int(config.num_hidden_layers))
    offsets = [-5, -4, -3, -2, -1]
    last, positions = {}, {}
    for name in ("harmful", "harmless"):
        ids = engine.encode(prompt_sets[name])
        # what the session computes with --direction-positions '[-1]' (prefix shared)
        last[name] = engine.residuals(ids, list(layers))
        if any(read != [-1] for read, _, _ in chosen.values()):
            positions[name] = engine.position_residuals(ids, list(layers), offsets)  # (n, 5, layers + 1, hidden)
    example = engine.encode(prompt_sets["harmful"][:1])[0]
    print("read positions -5..-1 are the tokens", [engine.tokenizer.decode([t]) for t in example[-5:]])
    result = {}
    for variant, (read, rank, _) in chosen.items():
        if read == [-1]:
            harmful, harmless = last["harmful"], last["harmless"]
        else:
            pick = [offsets.index(offset) for offset in read]
            harmful, harmless = positions["harmful"][:, pick].mean(dim=1), positions["harmless"][:, pick].mean(dim=1)
        directions = refusal_directions(harmful, harmless, settings.orthogonalize_direction)
        bases = subspace_bases(harmful, harmless, directions, rank) if rank > 1 else torch.empty(0)
        result[variant] = (directions, bases)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", default=",".join(str(t) for t, _ in PARAMETER_SETS), help="parameter sets to score, in order")
    parser.add_argument("--heldout", type=int, default=64, help="held-out harmful prompts counted")
    parser.add_argument("--kl-tokens", type=int, default=4)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated variant names (default: all)")
    parser.add_argument("--output", type=Path, default=RESULTS / "directions_ablation.json")
    parser.add_argument("--skip-original", action="store_true", help="do not score the original model")
    parser.add_argument(
        "--print-table", action="store_true", help="measure nothing: print the table of bench/results/directions_ablation*.json"
    )
    args = parser.parse_args()
    if args.print_table:
        print(table(merged_results()))
        return
    torch.manual_seed(0)
    settings = apply_demo_preset(Settings.model_validate({"demo": True, "judge": "markers", "batch_size": 64}))
    loaded = load(settings)
    arch = build_architecture_map(loaded.model)
    prompt_sets = load_prompt_sets(settings)
    engine = make_engine(settings, loaded, settings.batch_size)
    engine.response_prefix = choose_response_prefix(settings, engine, prompt_sets)
    started = time.perf_counter()
    chosen = {name: VARIANTS[name] for name in args.variants.split(",")}
    variants = variant_directions(engine, loaded, prompt_sets, settings, chosen)
    directions_s = time.perf_counter() - started
    # One set of adapters wide enough for k = 3 (the first rows of a k = 1 ablation are the same factors); the
    # full ablation's rank-r approximation, as when the screening was recorded.
    mode, rank = settings.row_normalization.value, settings.full_normalization_rank
    ablator = Ablator(loaded.model, arch, mode, rank, settings.seed, subspace_rank=3, exact=False)
    judge = make_judge(settings, engine, ablator)
    length = settings.max_response_length
    evaluator = Evaluator(engine, judge, prompt_sets["harmful_eval"], prompt_sets["harmless_eval"], length)
    long_kl = Evaluator(engine, judge, [], prompt_sets["harmless_eval"], length)
    long_kl.kl_tokens = args.kl_tokens
    heldout = Evaluator(
        engine, judge, load_prompts(settings.harmful_heldout_prompts, settings.system_prompt)[: args.heldout], [], length
    )

    ablator.reset()
    evaluator.measure_base()
    long_kl.measure_base()
    base = (
        {}
        if args.skip_original
        else {"refusals": evaluator.count_refusals().refusals, "heldout_refusals": heldout.count_refusals().refusals}
    )
    print("original model:", base)
    results: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "machine": machine(),
        "command": "python -m bench.research.directions_ablation " + " ".join(sys.argv[1:]),
        "model": "Qwen2.5-Coder-0.5B-Instruct Q4_K_M (demo), bf16",
        "eval_prompts": len(evaluator.harmful),
        "heldout_prompts": len(heldout.harmful),
        "max_response_length": length,
        "kl_tokens": args.kl_tokens,
        "directions_s": round(directions_s, 1),
        "original": base,
        "rows": [],
    }
    by_trial = dict(PARAMETER_SETS)
    for trial in map(int, args.trials.split(",")):
        text = by_trial[trial]
        parameters = parse_parameters(text)
        for variant, (directions, bases) in variants.items():
            _, rank, mlp = VARIANTS[variant]
            ablator.subspace = bases if rank > 1 else None
            ablator.apply(parameters if mlp else without_mlp(parameters), directions)
            row = score(evaluator, long_kl, heldout)
            row.update({"trial": trial, "parameters": text, "variant": variant})
            results["rows"].append(row)
            print(json.dumps(row, ensure_ascii=False))
            args.output.write_text(json.dumps(results, indent=2, ensure_ascii=False))
    print(table(results))


def score(evaluator: Evaluator, long_kl: Evaluator, heldout: Evaluator) -> dict[str, Any]:
    """Refusals, KL (first token and first N), held-out refusals, and the seconds of each part."""
    t0 = time.perf_counter()
    refusals = evaluator.count_refusals().refusals
    t1 = time.perf_counter()
    kl = evaluator.kl()
    t2 = time.perf_counter()
    kl_long = long_kl.kl()
    t3 = time.perf_counter()
    held = heldout.count_refusals().refusals
    t4 = time.perf_counter()
    return {
        "refusals": refusals,
        "kl": kl,
        "kl_n": kl_long,
        "heldout_refusals": held,
        "refusals_s": round(t1 - t0, 1),
        "kl_s": round(t2 - t1, 1),
        "kl_n_s": round(t3 - t2, 1),
        "heldout_s": round(t4 - t3, 1),
    }


def merged_results() -> dict[str, Any]:
    """The results of every run (directions_ablation*.json; runs split by --variants), rows ordered by trial."""
    runs = [json.loads(path.read_text()) for path in sorted(RESULTS.glob("directions_ablation*.json"))]
    merged = dict(runs[0], rows=[row for run in runs for row in run["rows"]])
    merged["original"] = next((run["original"] for run in runs if run["original"]), {})  # runs with --skip-original have none
    order = list(VARIANTS)
    merged["rows"].sort(key=lambda row: ([t for t, _ in PARAMETER_SETS].index(row["trial"]), order.index(row["variant"])))
    return merged


def table(results: dict[str, Any]) -> str:
    """Markdown table: one row per (parameter set, variant)."""
    n = results["kl_tokens"]
    lines = [
        f"| trial | variant | refusals /{results['eval_prompts']} | KL (1st token) | KL (first {n}) | held-out refusals /{results['heldout_prompts']} |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for row in results["rows"]:
        lines.append(
            f"| {row['trial']} | {row['variant']} | {row['refusals']} | {row['kl']:.4f} | {row['kl_n']:.4f} | {row['heldout_refusals']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
