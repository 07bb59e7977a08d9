"""Model card (README.md with Hugging Face front matter) for a saved result."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from .. import __version__
from ..config import PromptSet
from ..prompts import prompt_set_title

log = logging.getLogger(__name__)
TAGS = ["heretic", "abliterated", "uncensored", "decensored"]


def original_license(source: Any) -> str | None:
    """The licence of the original model: its card's front matter, or a GGUF file's general.license."""
    try:
        if source.gguf_file is not None:
            from gguf import GGUFReader

            field = GGUFReader(str(source.gguf_file)).get_field("general.license")
            if field is not None:
                return bytes(field.parts[field.data[0]]).decode("utf-8")
            return None
        if source.kind == "local":
            readme = Path(source.path) / "README.md"
            return _license_from_card(readme.read_text(encoding="utf-8")) if readme.is_file() else None
        from huggingface_hub import ModelCard

        return ModelCard.load(source.name).data.get("license")
    except Exception as error:  # noqa: BLE001 - offline hub, unreadable card: no licence then
        log.info("No licence found for %s (%s)", source.name, error)
        return None


def _license_from_card(text: str) -> str | None:
    match = re.search(r"^---\s*\n(.*?)\n---", text, re.DOTALL)
    if not match:
        return None
    found = re.search(r"^license:\s*(\S+)", match.group(1), re.MULTILINE)
    return found.group(1).strip("'\"") if found else None


def render_card(record: dict[str, Any], license_name: str | None) -> str:
    """The model card (README.md) of a saved result, from its reproduction record."""
    sections = [
        _front_matter(record, license_name),
        _introduction(record),
        _results(record),
        _parameters(record),
        _prompt_sets(record),
        CLOSING,
    ]
    return "\n".join(line for section in sections for line in section)


def _front_matter(record: dict[str, Any], license_name: str | None) -> list[str]:
    model = record["model"]
    base = model["name"]
    front = ["---", f"base_model: {base}" if model["kind"] == "hub" else f"# base model: {base}"]
    if license_name:
        front.append(f"license: {license_name}")
    return front + ["library_name: transformers", "tags:"] + [f"- {tag}" for tag in TAGS] + ["---", ""]


def _introduction(record: dict[str, Any]) -> list[str]:
    base = record["model"]["name"]
    return [
        f"# {Path(base).name} (abliterated with Heretic)",
        "",
        f'This is **{base}** with its refusal behaviour removed by directional ablation ("abliteration"), '
        f"made automatically by [Heretic](https://pypi.org/project/heretic/) {__version__}. No training was done: "
        "the weights that write into the residual stream were orthogonalized against a refusal direction, with "
        "the ablation's parameters chosen by an Optuna search that co-minimizes refusals on harmful prompts "
        "and the KL divergence from the original model on harmless prompts.",
        "",
    ]


def _results(record: dict[str, Any]) -> list[str]:
    trial, baseline = record["trial"], record["baseline"]
    refusals = f"≥{trial['refusals']}" if trial["refusals_is_lower_bound"] else str(trial["refusals"])
    return [
        "## Results",
        "",
        f"| model | refusals (harmful, /{baseline['n_prompts']}) | KL divergence from the original (harmless) |",
        "|---|---:|---:|",
        f"| original | {baseline['refusals']} | 0 |",
        f"| this model (trial {trial['number']}) | {refusals} | {trial['kl']:.4f} |",
        "",
        *_heldout(record.get("heldout")),
        f"Refusals were counted by {judge_description(record.get('settings', {}))}.",
        "",
    ] + _objectives(record)


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


def _heldout(heldout: dict[str, Any] | None) -> list[str]:
    """The held-out count, where it was made: how the refusal count carries over to prompts the search never saw."""
    if not heldout:
        return []
    n = heldout["n_prompts"]
    return [
        f"On {n} held-out harmful prompts, never used for the directions or the search, this model refused "
        f"{heldout['refusals']} ({heldout['refusals'] / n:.0%}) and the original {heldout['original_refusals']} "
        f"({heldout['original_refusals'] / n:.0%}).",
        "",
    ]


JUDGES = {
    "markers": "the markers judge (a response containing any refusal marker counts as a refusal)",
    "rules": "the rules judge (a decline, lecture or deflection in the response's opening, not followed by an attempt)",
    "model": "the model judge ({model} asked whether each response refuses)",
    "http": "the http judge ({model} behind an OpenAI-compatible endpoint asked whether each response refuses)",
}


def judge_description(settings: dict[str, Any]) -> str:
    """Which judge counted the refusals, in words (from the record's settings)."""
    if settings.get("refusal_scorer"):
        return f"a custom judge ({settings['refusal_scorer']})"
    judge = settings.get("judge", "markers")
    model = settings.get("judge_model") or ("the original model" if judge == "model" else "a model")
    if Path(model).expanduser().exists():  # a local folder or file: its name, never the user's path
        model = Path(model).name
    return JUDGES.get(judge, judge).format(model=model)


def _parameters(record: dict[str, Any]) -> list[str]:
    parameters, settings = record["trial"]["parameters"], record["settings"]
    index = f", index {parameters['direction_index']:.3f}" if parameters["direction_scope"] == "global" else ""
    lines = [
        "## Parameters",
        "",
        f"- direction: {parameters['direction_scope']}{index}",
        f"- row normalization: {settings['row_normalization']} (rank {settings['full_normalization_rank']})",
    ]
    for name, kernel in parameters["kernels"].items():
        lines.append(
            f"- {name}: max weight {kernel['max_weight']:.3f} at layer {kernel['max_weight_position']:.2f}, "
            f"min weight {kernel['min_weight']:.3f} at distance {kernel['min_weight_distance']:.2f}"
        )
    return lines


def _prompt_sets(record: dict[str, Any]) -> list[str]:
    lines = ["", "## Prompt sets", "", "| role | source | prompts | sha256 |", "|---|---|---:|---|"]
    for name, info in record["prompt_sets"].items():
        label = PromptSet.model_validate(info["spec"]).label()
        lines.append(f"| {prompt_set_title(name)} | `{label}` | {info['count']} | `{info['sha256'][:16]}` |")
    return lines


CLOSING = [
    "",
    "## Reproduce",
    "",
    "The file `heretic.json` beside this card records the tool and library versions, every setting, the "
    "prompt sets' content hashes and the chosen parameters. To rebuild these weights without a search:",
    "",
    "```",
    "pip install heretic",
    "heretic --reproduce heretic.json --output-dir rebuilt/",
    "```",
    "",
    "## Caution",
    "",
    "This model answers requests that its original refused. You are responsible for how you use it.",
    "",
]
