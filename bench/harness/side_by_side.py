"""The side-by-side report: the table of both tools' runs, the performance targets with their run-to-run
noise, the plot of the fronts, and the section of BENCHMARKS.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .machine import CPU_PROFILES
from .metrics import (
    KL_CAP,
    REFUSAL_CAPS,
    best_kl_at,
    combined_noise,
    compact_ranges,
    median_at,
    noise,
    spread_at,
)
from .models import MODELS
from .paths import BENCHMARKS, RESEARCH, RESULTS
from .publish import module_command, update_section
from .tools import log

QUICK_NOTE = "2026-12-02-reduced-side-by-side.md"  # where reduced runs are reported (docs/research/)

COLUMN_TITLES = {"reference": "reference", "ours": "ours", "ours_same_trials": "ours, first {n} trials"}


def table(results: dict[str, Any], with_fronts: bool = True) -> str:
    """Markdown table; the ratio column compares ours (over the same number of trials) with the reference. The
    fronts are left out with `with_fronts=False` (where the noise tables show them)."""
    tools = results["tools"]
    names = [name for name in ("reference", "ours_same_trials", "ours") if name in tools]
    compared = ("reference", "ours_same_trials" if "ours_same_trials" in tools else "ours")
    with_ratio = all(name in tools for name in compared)
    titles = [COLUMN_TITLES[name].format(n=tools[name]["n_trials"]) for name in names]
    rows = [
        ("time to first trial (s)", "time_to_first_trial_s", "{:.0f}"),
        ("median trial (s)", "median_trial_s", "{:.1f}"),
        ("total trial time (s)", "total_trials_s", "{:.0f}"),
        ("trials", "n_trials", "{}"),
        ("trials per hour", "trials_per_hour", "{:.1f}"),
        ("trials cut short (dominated)", "cut_trials", "{}"),
        ("peak RSS (MiB)", "peak_rss_mb", "{:.0f}"),
        ("original's refusals", "baseline_refusals", "{}"),
        (f"hypervolume (ref. point {results['settings']['eval_prompts']} refusals, KL {KL_CAP})", "hypervolume", "{:.3f}"),
    ]
    lines = [
        "| | " + " | ".join(titles) + (" | ours / reference |" if with_ratio else ""),
        "|---|" + "---:|" * (len(names) + with_ratio),
    ]
    for label, key, fmt in rows:
        cells = [fmt.format(tools[name][key]) if tools[name].get(key) is not None else "–" for name in names]
        ratio = ""
        if with_ratio and key not in {"n_trials", "baseline_refusals", "cut_trials"}:
            base, ours = (tools[name].get(key) for name in compared)
            ratio = f"{ours / base:.2f}×" if isinstance(base, (int, float)) and isinstance(ours, (int, float)) and base else ""
        lines.append(f"| {label} | " + " | ".join(cells) + (f" | {ratio} |" if with_ratio else " |"))
    for cap in REFUSAL_CAPS:
        values = [tools[name]["best_kl_at_refusals"].get(str(cap)) for name in names]
        if all(value is None for value in values):
            continue  # no run of either tool reaches this cap
        cells = [f"{v:.4f}" if v is not None else "–" for v in values]
        lines.append(f"| best KL at refusals ≤ {cap} | " + " | ".join(cells) + (" | |" if with_ratio else " |"))
    if with_fronts:
        for name, title in zip(names, titles):
            front = ", ".join(f"({r}, {kl:.3f})" for r, kl in tools[name]["pareto"])
            lines.append(f"| Pareto front, {title} (refusals, KL) | {front} |" + " |" * (len(names) - 1 + with_ratio))
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    styles = {"reference": ("tab:gray", "s", "heretic-llm 1.4.0 (reference)"), "ours": ("tab:red", "o", "Heretic (ours)")}
    for name, data in results["tools"].items():
        if name == "ours_same_trials":
            front = data["pareto"]
            if front:
                axes.step(
                    [p[0] for p in front],
                    [p[1] for p in front],
                    where="post",
                    color="tab:red",
                    linestyle="--",
                    label=f"Heretic (ours), first {data['n_trials']} trials",
                )
            continue
        color, marker, label = styles.get(name, ("tab:blue", "^", name))
        label = f"{label}, {data['n_trials']} trials"
        trials = [t for t in data["trials"] if not t["cut"]]
        axes.scatter([t["refusals"] for t in trials], [t["kl"] for t in trials], s=12, alpha=0.3, color=color, marker=marker)
        front = data["pareto"]
        if front:
            axes.step([p[0] for p in front], [p[1] for p in front], where="post", color=color, label=label)
            axes.scatter([p[0] for p in front], [p[1] for p in front], color=color, marker=marker, s=30)
    axes.set_xlabel(f"refusals (of {results['settings']['eval_prompts']} harmful prompts)")
    axes.set_ylabel("KL divergence from the original")
    axes.set_yscale("log")
    quick = " — reduced run, not the full benchmark" if results["settings"]["quick"] else ""
    axes.set_title(f"Pareto fronts{quick}", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=130)


def settings_paragraph(results: dict[str, Any]) -> str:
    """What the run shared between the tools: machine, dtype, model, prompts, search settings."""
    settings = results["settings"]
    tools = results["tools"]
    model = MODELS[settings.get("model", "demo")]
    profile = settings.get("cpu_profile", "native")
    parts = [
        f"{'**Reduced run** (' + settings['deviations'] + '; not the full benchmark). ' if settings['quick'] else ''}"
        f"Machine: {settings['machine']}; profile {profile}"
        + (f" ({' '.join(f'{k}={v}' for k, v in CPU_PROFILES[profile].items())} for both tools)" if profile != "native" else "")
        + f". Compute dtype: reference bfloat16 (its default), ours {tools.get('ours', {}).get('dtype') or 'bfloat16'}. "
        f"Model {model} (Q4_K_M GGUF dequantized to bf16 safetensors). Directions from harmful_train and harmless_train"
        f"[:{settings['train_prompts']}]; refusals on harmful_test[:{settings['eval_prompts']}], KL on harmless_test"
        f"[:{settings['eval_prompts']}]; max_response_length {settings['max_response_length']}, automatic batch size (max "
        f"{settings['max_batch_size']}), {settings['trials']} trials, {settings['startup_trials']} random start-up trials, "
        f"seed {settings['seed']}, the reference's {settings['n_markers']} refusal markers for both.",
    ]
    if "ours_same_trials" in tools:
        n = tools["ours_same_trials"]["n_trials"]
        parts.append(
            f"The reference completed only {n} of {settings['trials']} trials (its run was stopped); "
            f'"ours, first {n} trials" is the study a run of {n} trials of ours gives.'
        )
    if settings.get("reference_reused"):
        parts.append(
            f"The reference's numbers come from its recorded run with identical settings ({settings['reference_reused']})."
        )
    return " ".join(parts)


def write_markdown(results: dict[str, Any]) -> str:
    """The run's section: its settings, the table, the targets and both tools' run-to-run noise (the every-cap
    comparison is printed by the run; both tools' full configurations are in the results file)."""
    settings = results["settings"]
    tools = results["tools"]
    image = "fronts-quick.png" if settings["quick"] else "fronts.png"
    parts = [
        settings_paragraph(results),
        "",
        table(results, with_fronts=not {"noise", "reference_noise"} <= set(results)),
        "",
        f"![Pareto fronts](bench/results/{image})",
        "",
    ]
    if "reference" in tools and "ours" in tools:
        parts += ["| target | reference | ours | verdict |", "|---|---:|---:|---|"]
        reached = [row for row in targets(results) if row[1:3] != ("–", "–")]  # caps that neither tool reaches: left out
        parts += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in reached]
        parts.append("")
    if "noise" in results:
        parts += [
            "Run-to-run noise of our search (other seeds, everything else identical):",
            "",
            noise_table(results["noise"]),
            "",
        ]
    if "reference_noise" in results:
        parts += [
            "Run-to-run noise of the reference's search: its run above, and its own sampler, parameter space and "
            f"objectives re-run with other seeds through our ablation and scoring (`{module_command(results['reference_noise']['command'])}`):",
            "",
            noise_table(results["reference_noise"], "reference", with_time=False),
            "",
        ]
    if "noise" in results:
        parts.append(
            "A shortfall counts as within noise up to √(a² + b²), a and b the spreads (max − min) of each tool's runs; "
            "the last target row compares the medians of each tool's runs at every cap."
        )
    return "\n".join(parts)


def targets(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """Each performance target as (target, reference, ours, verdict). The front is compared at the same
    number of trials; a KL or hypervolume shortfall smaller than the spread between our seeds is
    'within noise'."""
    tools = results["tools"]
    reference = tools["reference"]
    ours = tools.get("ours_same_trials", tools["ours"])
    spread = tolerances(results)
    rows: list[tuple[str, str, str, str]] = []

    def ratio_row(label: str, key: str, limit: float, fmt: str) -> None:
        base, value = reference.get(key), ours.get(key)
        if base is None or value is None:
            rows.append((label, "–", "–", "not measured"))
            return
        verdict = f"{'met' if value <= limit * base else 'NOT met'} ({value / base:.2f}×)"
        rows.append((label, fmt.format(base), fmt.format(value), verdict))

    ratio_row("median trial ≤ 0.25 × reference (s)", "median_trial_s", 0.25, "{:.1f}")
    ratio_row("time to first trial ≤ 0.5 × reference (s)", "time_to_first_trial_s", 0.5, "{:.0f}")
    ratio_row("peak RSS ≤ reference (MiB)", "peak_rss_mb", 1.0, "{:.0f}")

    def verdict(shortfall: float, tolerance: float | None) -> str:
        if shortfall <= 0:
            return "met"
        if tolerance is not None and shortfall <= tolerance:
            return f"met within noise (short by {shortfall:.4f}, run-to-run noise {tolerance:.4f})"
        return f"NOT met (short by {shortfall:.4f}" + (
            f", run-to-run noise {tolerance:.4f})" if tolerance is not None else ", noise not measured)"
        )

    base, value = reference["hypervolume"], ours["hypervolume"]
    rows.append(("hypervolume ≥ reference", f"{base:.3f}", f"{value:.3f}", verdict(base - value, spread.get("hypervolume"))))
    for cap in REFUSAL_CAPS:
        base, value = reference["best_kl_at_refusals"][str(cap)], ours["best_kl_at_refusals"][str(cap)]
        label = f"best KL at refusals ≤ {cap} ≤ reference"
        if base is None:
            rows.append((label, "–", f"{value:.4f}" if value is not None else "–", "met (the reference has no trial there)"))
        elif value is None:
            rows.append((label, f"{base:.4f}", "–", "NOT met (no trial of ours there)"))
        else:
            rows.append((label, f"{base:.4f}", f"{value:.4f}", verdict(value - base, spread.get(str(cap)))))
    return rows + every_cap_rows(results)


def every_cap_rows(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """The targets between the listed caps too: every k at which the reference's front is lower than ours, with
    the run-to-run noise at that k (both tools' spreads combined) as the tolerance; and, where both tools' noise
    is measured, the caps at which the median of our runs is above the reference's."""
    beyond: list[int] = []
    within: list[int] = []
    typical: list[int] = []
    for row in every_cap(results):
        k, base, value, tolerance = row["k"], row["reference"], row["ours"], row["tolerance"]
        if row["reference_median"] is not None and (row["ours_median"] is None or row["ours_median"] > row["reference_median"]):
            typical.append(k)
        if base is None or (value is not None and value <= base):
            continue
        (within if value is not None and tolerance is not None and value - base <= tolerance else beyond).append(k)
    noisy = f" (within noise at k = {compact_ranges(within)})" if within else ""
    verdict = f"NOT met at k = {compact_ranges(beyond)}{noisy}" if beyond else f"met{noisy}"
    rows = [(f"best KL ≤ reference at every cap k = 0…{results['settings']['eval_prompts']}", "", "", verdict)]
    if "reference_noise" in results and "noise" in results:
        median = f"NOT met at k = {compact_ranges(typical)}" if typical else "met"
        rows.append(("median of runs: best KL ≤ reference's median at every cap", "", "", median))
    return rows


def tolerances(results: dict[str, Any]) -> dict[str, float | None]:
    """Run-to-run noise per measure, from our seeds' spread and, where measured, the reference's (its run
    and its search re-run with other seeds)."""
    spreads = [results[key]["spread"] for key in ("noise", "reference_noise") if key in results]
    return {key: combined_noise([spread.get(key) for spread in spreads]) for key in {key for spread in spreads for key in spread}}


def every_cap(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per refusal cap k: the reference's and our best KL; each of our seeds' and each reference run's, with
    each tool's spread (max - min) and median over its runs; the tolerance is the two spreads combined."""
    tools = results["tools"]
    reference, ours = tools["reference"], tools.get("ours_same_trials", tools["ours"])
    seeds = results.get("noise", {}).get("seeds", {})
    reference_runs = results.get("reference_noise", {}).get("seeds", {})
    rows = []
    for k in range(results["settings"]["eval_prompts"] + 1):
        per_seed = {seed: best_kl_at(data["pareto"], k) for seed, data in seeds.items()}
        per_run = {run: best_kl_at(data["pareto"], k) for run, data in reference_runs.items()}
        seed_spread, reference_spread = spread_at(list(per_seed.values())), spread_at(list(per_run.values()))
        rows.append(
            {
                "k": k,
                "reference": best_kl_at(reference["pareto"], k),
                "ours": best_kl_at(ours["pareto"], k),
                "seeds": per_seed,
                "seed_spread": seed_spread,
                "reference_runs": per_run,
                "reference_spread": reference_spread,
                "ours_median": median_at(list(per_seed.values())),
                "reference_median": median_at(list(per_run.values())),
                "tolerance": combined_noise([seed_spread, reference_spread]),
            }
        )
    return rows


def cell(value: float | None) -> str:
    return f"{value:.4f}" if value is not None else "–"


def every_cap_table(results: dict[str, Any]) -> str:
    """Markdown rows for the caps at which either tool has a trial, up to the last cap where the fronts differ."""
    rows = [r for r in every_cap(results) if r["reference"] is not None or r["ours"] is not None]
    while len(rows) > 1 and rows[-1]["reference"] == rows[-2]["reference"] and rows[-1]["ours"] == rows[-2]["ours"]:
        rows.pop()
    seeds = list(rows[0]["seeds"]) if rows else []
    runs = list(rows[0]["reference_runs"]) if rows else []
    columns = ["k", "reference", "ours", *(f"ours, seed {s}" for s in seeds), "our spread"]
    if runs:
        columns += [f"reference, {run}" for run in runs] + ["reference spread", "our median", "reference median"]
    columns.append("ours − reference")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---:|" * len(columns)]
    for r in rows:
        gap = r["ours"] - r["reference"] if r["ours"] is not None and r["reference"] is not None else None
        cells = [
            str(r["k"]),
            cell(r["reference"]),
            cell(r["ours"]),
            *(cell(r["seeds"][s]) for s in seeds),
            cell(r["seed_spread"]),
        ]
        if runs:
            cells += [cell(r["reference_runs"][run]) for run in runs]
            cells += [cell(r["reference_spread"]), cell(r["ours_median"]), cell(r["reference_median"])]
        cells.append("–" if gap is None else f"{gap:+.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def noise_table(noise_data: dict[str, Any], first_column: str = "seed", with_time: bool = True) -> str:
    """Each run's front metrics and their spread; with_time adds the median trial time."""
    runs = noise_data["seeds"]
    time_title = " median trial (s) |" if with_time else ""
    lines = [
        f"| {first_column} |{time_title} hypervolume | "
        + " | ".join(f"best KL, ≤ {cap}" for cap in REFUSAL_CAPS)
        + " | Pareto front (refusals, KL) |",
        "|---|" + "---:|" * (1 + with_time + len(REFUSAL_CAPS)) + "---|",
    ]
    for run, data in runs.items():
        cells = [f"{v:.4f}" if v is not None else "–" for v in (data["best_kl_at_refusals"][str(c)] for c in REFUSAL_CAPS)]
        timing = f" {data['median_trial_s']:.1f} |" if with_time else ""
        front = ", ".join(f"({r}, {kl:.3f})" for r, kl in data["pareto"])
        lines.append(f"| {run} |{timing} {data['hypervolume']:.3f} | " + " | ".join(cells) + f" | {front} |")
    spread = noise_data["spread"]
    cells = [f"{spread[str(c)]:.4f}" if spread.get(str(c)) is not None else "–" for c in REFUSAL_CAPS]
    lines.append(f"| spread (max − min) |{' |' if with_time else ''} {spread['hypervolume']:.3f} | " + " | ".join(cells) + " | |")
    return "\n".join(lines)


def search_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings two searches must share to be compared (everything but the seed and the machine)."""
    keys = (
        "trials",
        "startup_trials",
        "train_prompts",
        "eval_prompts",
        "max_response_length",
        "max_batch_size",
        "datasets",
        "n_markers",
    )
    return {key: settings.get(key) for key in keys}


def attach_reference_noise(results: dict[str, Any]) -> None:
    """The reference's run-to-run noise, where bench.reference_search has measured it with the same
    settings: its real run and its search re-run by our engine with each seed."""
    path = RESULTS / "reference-search.json"
    if "reference" not in results["tools"] or not path.exists():
        return
    searched = json.loads(path.read_text())
    if searched.get("settings") != search_settings(results["settings"]) or not searched["seeds"]:
        log(f"{path.name} was measured with other settings than the latest run; run `python -m bench.reference_search` again")
        return
    runs = {f"run, seed {results['settings']['seed']}": results["tools"]["reference"]}
    runs.update({f"search, seed {seed}": data for seed, data in searched["seeds"].items()})
    results["reference_noise"] = dict(noise(runs), command=searched["command"])


def publish(results: dict[str, Any], plot_fronts: bool = True) -> None:
    """The plot and the run's section: "full" in BENCHMARKS.md, or for a reduced run "quick" in its research note."""
    attach_reference_noise(results)
    settings = results["settings"]
    if plot_fronts:
        plot(results, RESULTS / ("fronts-quick.png" if settings["quick"] else "fronts.png"))
    command = settings.get("command", "python -m bench.run_bench")
    path = RESEARCH / QUICK_NOTE if settings["quick"] else BENCHMARKS
    update_section(write_markdown(results), "quick" if settings["quick"] else "full", settings, command, path)
