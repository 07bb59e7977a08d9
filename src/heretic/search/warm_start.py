"""Warm start (--warm-start RECORD): published results' parameters as the first trials of a new search.

Each RECORD is a reproduction record (heretic.json): a path (or the folder holding one), a Hugging Face
repository id or URL (its heretic.json is downloaded), or an https URL of a heretic.json. Its chosen
trial is enqueued in the study, so that the search's first trials run it before the sampler proposes its
own: a user abliterating the 14B sibling of a published 7B model starts from the 7B's result.

The record's model must have the same architecture (the transformers class, e.g. Qwen2ForCausalLM) as the
model searched; its layer count L may differ from this model's L'. The parameters measured in layers are
mapped by their fraction of the stack:

    a position (the direction index, a component's peak position)   x' = x (L' - 1) / (L - 1)
    a distance (a component's reach D, Wmin's distance)              d' = d L' / L

so a peak at the last layer stays at the last layer, and a reach over a quarter of the stack stays a
quarter. A position or distance mapped outside the search space's range for it (--direction-index-range,
--peak-position-range, reach [1, 0.6 (L' - 1)]) is clamped into it, as is a weight outside [0.8, 1.5],
and each clamp is shown. Weights and the direction scope are taken as they are; a component the
record has and this model lacks is left out, one this model has and the record lacks is sampled.
"""

from __future__ import annotations

import tempfile
import urllib.request
from dataclasses import dataclass
from typing import Any

import optuna

from ..ablation.parameters import AblationParameters
from ..config import Settings
from ..errors import HereticError, first_line
from ..ui import console
from .records import hub_repo, read_record
from .space import MAX_MAX_WEIGHT, MIN_MAX_WEIGHT, LayerRanges

DOWNLOAD_TIMEOUT_S = 60


@dataclass(frozen=True)
class RecordedTrial:
    """The chosen trial of one record, and the model it was found on."""

    source: str  # the RECORD as given
    architecture: str
    num_layers: int
    parameters: AblationParameters


def map_position(position: float, layers: int, new_layers: int) -> float:
    """A layer position in a stack of `layers` moved to the same fraction of one of `new_layers`:
    x' = x (L' - 1) / (L - 1) (a 1-layer stack's only position stays 0)."""
    return position * (new_layers - 1) / (layers - 1) if layers > 1 else 0.0


def map_distance(distance: float, layers: int, new_layers: int) -> float:
    """A distance in layers scaled with the stack: d' = d L' / L."""
    return distance * new_layers / layers


def read_recorded_trials(specs: list[str], architecture: str) -> list[RecordedTrial]:
    """The chosen trial of each record; a record of another architecture is refused (one sentence)."""
    trials = []
    for spec in specs:
        trial = read_recorded_trial(spec)
        if trial.architecture != architecture:
            raise HereticError(
                f"The warm-start record {spec} is of a {trial.architecture} model and this one is a {architecture}; "
                "a warm start needs the same architecture."
            )
        trials.append(trial)
    return trials


def read_recorded_trial(spec: str) -> RecordedTrial:
    """The record's chosen trial and its model's architecture and layer count."""
    data = read_record(download_url(spec) if is_plain_url(spec) else spec)
    model = data["model"]
    architecture, layers = model.get("architecture"), model.get("num_layers")
    if not isinstance(architecture, str) or not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
        raise HereticError(
            f"The record {spec} does not name its model's architecture and layer count (it predates --warm-start); "
            "a warm start needs a record saved by this version."
        )
    return RecordedTrial(spec, architecture, layers, AblationParameters.from_dict(data["trial"]["parameters"]))


def is_plain_url(spec: str) -> bool:
    """An http(s) URL that is not a Hugging Face repository's (those go through the Hub's client)."""
    return spec.startswith(("https://", "http://")) and hub_repo(spec) is None


def download_url(url: str) -> str:
    """The file at `url`, downloaded to a temporary file; its path."""
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:  # noqa: S310 - the user's URL
            content = response.read()
    except (OSError, ValueError) as error:
        raise HereticError(f"Could not download the warm-start record {url} ({first_line(error, 160)}).") from None
    with tempfile.NamedTemporaryFile("wb", suffix=".json", prefix="heretic-warm-start-", delete=False) as file:
        file.write(content)
    return file.name


class Clamps(list[str]):
    """The clamps made while mapping a trial, in words."""

    def into(self, name: str, value: float, low: float, high: float) -> float:
        """`value` clamped into [low, high]; a change is noted."""
        inside = min(max(value, low), high)
        if inside != value:
            self.append(f"{name} {value:.3g} → {inside:.3g}")
        return inside


def trial_params(
    trial: RecordedTrial, num_layers: int, components: list[str], ranges: LayerRanges
) -> tuple[dict[str, Any], list[str]]:
    """(the Optuna parameters of the recorded trial on a model of `num_layers`, the clamps made, in words).
    The names and ranges are those of search/space.py's suggest_parameters."""
    last, clamps = num_layers - 1, Clamps()
    (index_low, index_high), (peak_low, peak_high) = ranges.direction_index, ranges.peak_position
    parameters = trial.parameters
    index = map_position(parameters.direction_index, trial.num_layers, num_layers)
    params: dict[str, Any] = {
        "direction_scope": parameters.direction_scope,
        "direction_index": clamps.into("direction_index", index, index_low * last, index_high * last),
    }
    for component in components:
        kernel = parameters.kernels.get(component)
        if kernel is None:
            continue
        weight = kernel.max_weight
        fraction = kernel.min_weight / weight if weight > 0 else 0.0
        params[f"{component}.max_weight"] = clamps.into(f"{component}.max_weight", weight, MIN_MAX_WEIGHT, MAX_MAX_WEIGHT)
        params[f"{component}.min_weight_fraction"] = clamps.into(f"{component}.min_weight_fraction", fraction, 0.0, 1.0)
        position = map_position(kernel.max_weight_position, trial.num_layers, num_layers)
        params[f"{component}.max_weight_position"] = clamps.into(
            f"{component}.max_weight_position", position, peak_low * last, peak_high * last
        )
        distance = map_distance(kernel.min_weight_distance, trial.num_layers, num_layers)
        params[f"{component}.min_weight_distance"] = clamps.into(
            f"{component}.min_weight_distance", distance, 1.0, max(1.0, 0.6 * last)
        )
    return params, list(clamps)


def enqueue_warm_start(
    study: optuna.Study, trials: list[RecordedTrial], num_layers: int, components: list[str], settings: Settings
) -> int:
    """Enqueue the recorded trials as the first trials of a new search (none once the study has finished
    trials: a resumed search goes on as it was), in the search space `settings` give; the number enqueued."""
    if not trials:
        return 0
    if study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        console.print("--warm-start is left aside: this search has finished trials already")
        return 0
    for trial in trials:
        ranges = LayerRanges.of_settings(settings)
        params, clamps = trial_params(trial, num_layers, components, ranges)
        study.enqueue_trial(params, skip_if_exists=True)
        scaled = f"{trial.num_layers} → {num_layers} layers"
        clamped = f"; clamped into the search space: {', '.join(clamps)}" if clamps else ""
        console.print(f"Warm start: the trial of {trial.source} ({trial.architecture}, {scaled}) runs first{clamped}")
    return len(trials)
