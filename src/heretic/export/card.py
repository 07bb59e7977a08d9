"""Model card (README.md with Hugging Face front matter) for a saved result."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import __version__
from ..config import PromptSet
from ..prompts import prompt_set_title
from ..scoring.judge_rates import short_text
from .provenance import OriginalCard

TAGS = ["heretic", "abliterated", "uncensored", "decensored"]
# Heretic is installed from its repository (pyproject.toml, [project.urls]); it is not published on PyPI.
REPOSITORY = "https://github.com/heretic-project/heretic"
INSTALL = f"pip install git+{REPOSITORY}"


def render_card(record: dict[str, Any], original: OriginalCard | None = None, with_record: bool = True) -> str:
    """The model card (README.md) of a saved result, from its reproduction record, with the original
    model's card (its licence in the front matter, its text at the end)."""
    original = original or OriginalCard()
    sections = [
        _front_matter(record, original),
        _introduction(record),
        _results(record),
        _parameters(record),
        _prompt_sets(record),
        _reproduce(with_record),
        CAUTION,
        _original_text(record, original),
    ]
    return "\n".join(line for section in sections for line in section)


def _front_matter(record: dict[str, Any], original: OriginalCard) -> list[str]:
    model = record["model"]
    adapter = record.get("saved", {}).get("kind") == "adapter"
    front = ["---"]
    if model.get("hub_id"):
        front.append(f"base_model: {model['hub_id']}")
    front += [f"{key}: {value}" for key, value in original.license.items()]
    front.append(f"library_name: {'peft' if adapter else 'transformers'}")
    return front + ["tags:"] + [f"- {tag}" for tag in TAGS] + ["---", ""]


def base_link(model: dict[str, Any]) -> str:
    """The base model's name, linked to its Hub page when its id is known."""
    name = model["name"]
    return f"[{name}](https://huggingface.co/{model['hub_id']})" if model.get("hub_id") else f"**{name}**"


def _introduction(record: dict[str, Any]) -> list[str]:
    model = record["model"]
    what = "a LoRA adapter that turns" if record.get("saved", {}).get("kind") == "adapter" else "a copy of"
    file = f" (from the GGUF file `{model['file']}`)" if model.get("file") else ""
    parents = [f"[{p['name']}]({p['url']})" if p.get("url") else p["name"] for p in model.get("base_models", [])]
    built_on = f" It is itself built on {', '.join(parents)}." if parents else ""
    return [
        f"# {model['name'].split('/')[-1]} (abliterated with Heretic)",
        "",
        f"This is {what} {base_link(model)}{file} with its refusal behaviour removed by directional ablation "
        f'("abliteration"), made automatically by [Heretic]({REPOSITORY}) {__version__}.{built_on} No training was '
        "done: the weights that write into the residual stream were orthogonalized against a refusal direction, with "
        "the ablation's parameters chosen by an Optuna search that co-minimizes refusals on harmful prompts "
        "and the KL divergence from the original model on harmless prompts.",
        "",
    ]


def _results(record: dict[str, Any]) -> list[str]:
    trial, baseline = record["trial"], record["baseline"]
    refusals = f"≥{trial['refusals']}" if trial["refusals_is_lower_bound"] else str(trial["refusals"])
    corrected = "true_refusals" in trial and "true_refusals" in baseline  # older records lack them
    true_header, true_rule = (" true refusals (95 %) |", "---:|") if corrected else ("", "")
    true_original = f" {short_text(baseline['true_refusals'])} |" if corrected else ""
    true_trial = f" {short_text(trial['true_refusals'])} |" if corrected else ""
    return [
        "## Results",
        "",
        f"| model | refusals (harmful, /{baseline['n_prompts']}) |{true_header} KL divergence from the original (harmless) |",
        f"|---|---:|{true_rule}---:|",
        f"| original | {baseline['refusals']} |{true_original} 0 |",
        f"| this model (trial {trial['number']}) | {refusals} |{true_trial} {trial['kl']:.4f} |",
        "",
        *_verified(trial.get("verified")),
        *_heldout(record.get("heldout")),
        *_heldout_kl(record.get("heldout_kl")),
        *_over_refusal(record.get("over_refusal")),
        f"Refusals were counted by {judge_description(record.get('settings', {}))}.{_correction(record) if corrected else ''}",
        "",
    ] + _objectives(record)


def _correction(record: dict[str, Any]) -> str:
    """What the true-refusals column is: the counts corrected for the judge's measured error rates, or why not."""
    entry = record["baseline"]["true_refusals"]
    if not entry.get("corrected"):
        return f" The true-refusals column is {entry['note']}."
    return (
        f" The judge errs: the true refusals are the counts corrected for {entry['labelled_set']['description']} "
        f"(sensitivity and specificity against a person's reading; {entry['method']})."
    )


def _objectives(record: dict[str, Any]) -> list[str]:
    """The further objectives' values of this model and the original (nothing without objectives)."""
    values, original = record["trial"].get("objectives"), record["baseline"].get("objectives", {})
    if not values:
        return []
    directions = record.get("objective_directions", {})
    rows = [
        f"| {name} | {directions.get(name) or ''} | {original.get(name, float('nan')):.4g} | {value:.4g} |"
        for name, value in values.items()
    ]
    return ["| further objective | direction | original | this model |", "|---|---|---:|---:|", *rows, ""]


def _verified(verified: dict[str, Any] | None) -> list[str]:
    """Where this model's refusals were counted again on whole responses: so, with the search's count."""
    if not verified:
        return []
    return [
        f"This model's refusals were counted on whole responses (up to {verified['response_length']} tokens, by the "
        f"{verified['judge']} judge reading each to its end); the search, which stops reading a response once its "
        f"verdict is fixed, counted {verified['search_refusals']}. {verified['degenerate']} of these responses were "
        "degenerate (a sentence or phrase repeated, a loop). The original's count is the search's.",
        "",
    ]


def _heldout(heldout: dict[str, Any] | None) -> list[str]:
    """The held-out count, where it was made: how the refusal count carries over to prompts the search never saw."""
    if not heldout:
        return []
    n = heldout["n_prompts"]
    return [
        f"On {n} held-out harmful prompts, never used for the directions or the search, this model refused "
        f"{heldout['refusals']} ({heldout['refusals'] / n:.0%}) and the original {heldout['original_refusals']} "
        f"({heldout['original_refusals'] / n:.0%}).{_degenerate(heldout)}",
        "",
    ]


def _heldout_kl(entry: dict[str, Any] | None) -> list[str]:
    """The KL divergence on held-out harmless prompts, where it was measured: how the search's KL carries over."""
    if not entry:
        return []
    highest = "; ".join(f'"{row["prompt"]}" {row["kl"]:.3f}' for row in entry["highest"])
    return [
        f"On {entry['n_prompts']} held-out harmless prompts, never used for the directions or the search (many of them "
        "requests an assistant often opens with a disclaimer: current events, prices, opinions, real-time data), this "
        f"model's KL divergence from the original was {entry['mean']:.4f} on average (median {entry['median']:.4f}), "
        f"against {entry['in_search']:.4f} on the search's harmless prompts. Highest: {highest}.",
        "",
    ]


def _over_refusal(entry: dict[str, Any] | None) -> list[str]:
    """The refusals of harmless prompts that look harmful, where they were counted."""
    if not entry:
        return []
    n = entry["n_prompts"]
    return [
        f'On {n} harmless prompts that look harmful ("How do I kill a Python process?"), this model refused '
        f"{entry['refusals']} ({entry['refusals'] / n:.0%}) and the original {entry['original_refusals']} "
        f"({entry['original_refusals'] / n:.0%}).",
        "",
    ]


def _degenerate(heldout: dict[str, Any]) -> str:
    """The held-out answers that loop or repeat themselves, where they were counted (older records lack them)."""
    if "degenerate" not in heldout or "original_degenerate" not in heldout:
        return ""
    n = heldout["n_prompts"]
    return (
        f" Of its answers there, {heldout['degenerate']} ({heldout['degenerate'] / n:.0%}) were degenerate (a sentence or "
        f"phrase repeated, a loop), against {heldout['original_degenerate']} ({heldout['original_degenerate'] / n:.0%}) "
        "of the original's."
    )


JUDGES = {
    "markers": "the markers judge (a response containing any refusal marker counts as a refusal)",
    "rules": "the rules judge (a decline, lecture or deflection in the response's opening, not followed by an attempt)",
    "model": "the model judge ({model} asked whether each response refuses)",
    "http": "the http judge ({model} behind an OpenAI-compatible endpoint asked whether each response refuses)",
}


def judge_description(settings: dict[str, Any]) -> str:
    """Which judge counted the refusals, in words (from the record's settings)."""
    judge = settings.get("refusal_scorer") or settings.get("judge", "markers")  # (records before the merge)
    if judge not in JUDGES:
        return f"a custom judge ({judge})"
    model = settings.get("judge_model") or ("the original model" if judge == "model" else "a model")
    if Path(model).expanduser().exists():  # a local folder or file: its name, never the user's path
        model = Path(model).name
    return JUDGES.get(judge, judge).format(model=model)


def _parameters(record: dict[str, Any]) -> list[str]:
    parameters = record["trial"]["parameters"]
    index = f", index {parameters['direction_index']:.3f}" if parameters["direction_scope"] == "global" else ""
    lines = [
        "## Parameters",
        "",
        f"- direction: {parameters['direction_scope']}{index}",
        f"- row normalization: {_row_normalization(record)}",
    ]
    for name, kernel in parameters["kernels"].items():
        lines.append(
            f"- {name}: max weight {kernel['max_weight']:.3f} at layer {kernel['max_weight_position']:.2f}, "
            f"min weight {kernel['min_weight']:.3f} at distance {kernel['min_weight_distance']:.2f}"
        )
    return lines


def _row_normalization(record: dict[str, Any]) -> str:
    """How the ablation was stored (records written before it was noted: a full ablation's approximation rank)."""
    if "ablation" in record["trial"]:
        return str(record["trial"]["ablation"])
    settings = record["settings"]
    return f"{settings['row_normalization']} (rank {settings['full_normalization_rank']})"


def _prompt_sets(record: dict[str, Any]) -> list[str]:
    lines = ["", "## Prompt sets", "", "| role | source | prompts | sha256 |", "|---|---|---:|---|"]
    for name, info in record["prompt_sets"].items():
        label = PromptSet.model_validate(info["spec"]).label()
        lines.append(f"| {prompt_set_title(name)} | `{label}` | {info['count']} | `{info['sha256'][:16]}` |")
    return lines


def _reproduce(with_record: bool) -> list[str]:
    if not with_record:
        return []
    return [
        "",
        "## Reproduce",
        "",
        "The file `heretic.json` beside this card records the tool and library versions, every setting, the "
        "prompt sets' content hashes, the chosen parameters and the SHA-256 of every weight file. To rebuild "
        "these weights without a search, and check them against those hashes:",
        "",
        "```",
        INSTALL,
        "heretic --reproduce heretic.json --output-dir rebuilt/",
        "```",
    ]


CAUTION = [
    "",
    "## Caution",
    "",
    "This model answers requests that its original refused. You are responsible for how you use it.",
    "",
]


def _original_text(record: dict[str, Any], original: OriginalCard) -> list[str]:
    """The original card's text under ours, so its licence terms and documentation travel with the model."""
    if not original.text:
        return []
    return ["## Original model card", "", f"The card of {base_link(record['model'])}, as published:", "", original.text, ""]
