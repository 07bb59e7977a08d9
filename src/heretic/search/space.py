"""The search space: how a trial's ablation parameters are sampled."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import optuna

from ..ablation.parameters import AblationParameters, ComponentKernel
from ..config import Settings

# Range of the sampled max_weight, for every component. A lower MLP bound that lets the search switch
# MLP ablation off (-0.25, clamped at 0) gave a lower mean hypervolume on the benchmark (BENCHMARKS.md).
MIN_MAX_WEIGHT = 0.8
MAX_MAX_WEIGHT = 1.5


@dataclass(frozen=True)
class LayerRanges:
    """Where the direction index and each component's peak are sampled: (low, high) as fractions of
    the last layer's index L - 1 (--direction-index-range, --peak-position-range)."""

    direction_index: tuple[float, float]
    peak_position: tuple[float, float]

    @classmethod
    def of(cls, direction_index: Sequence[float], peak_position: Sequence[float]) -> LayerRanges:
        """From the two settings' [low, high] lists."""
        return cls((direction_index[0], direction_index[1]), (peak_position[0], peak_position[1]))

    @classmethod
    def of_settings(cls, settings: Settings) -> LayerRanges:
        """The ranges `settings` give (a replayed trial needs the ranges its search sampled in)."""
        return cls.of(settings.direction_index_range, settings.peak_position_range)

    @classmethod
    def default(cls) -> LayerRanges:
        fields = Settings.model_fields
        return cls.of(fields["direction_index_range"].default, fields["peak_position_range"].default)


def suggest_parameters(
    trial: optuna.trial.BaseTrial,  # a Trial in a search, a FixedTrial when a stored trial is replayed
    num_layers: int,
    components: list[str],
    ranges: LayerRanges | None = None,
) -> AblationParameters:
    """Sample one ablation. Ranges in layers: direction index and peak position in their `ranges` of the
    stack (default [0.4, 0.9] and [0.6, 1.0] of L - 1), reach D in [1, 0.6 (L-1)], Wmin a fraction of W."""
    last = num_layers - 1
    ranges = ranges or LayerRanges.default()
    (index_low, index_high), (peak_low, peak_high) = ranges.direction_index, ranges.peak_position
    scope = trial.suggest_categorical("direction_scope", ["global", "per-layer"])
    index = trial.suggest_float("direction_index", index_low * last, index_high * last)
    kernels: dict[str, ComponentKernel] = {}
    for component in components:
        weight = trial.suggest_float(f"{component}.max_weight", MIN_MAX_WEIGHT, MAX_MAX_WEIGHT)
        position = trial.suggest_float(f"{component}.max_weight_position", peak_low * last, peak_high * last)
        fraction = trial.suggest_float(f"{component}.min_weight_fraction", 0.0, 1.0)
        distance = trial.suggest_float(f"{component}.min_weight_distance", 1.0, max(1.0, 0.6 * last))
        kernels[component] = ComponentKernel(weight, position, fraction * weight, distance)
    return AblationParameters(scope, index, kernels)


def describe(parameters: AblationParameters) -> str:
    """One line: direction and each component's kernel."""
    direction = f"dir {parameters.direction_index:.1f}" if parameters.direction_scope == "global" else "dir per-layer"
    parts = [direction]
    for name, kernel in parameters.kernels.items():
        if kernel.max_weight == 0:
            parts.append(f"{name} off")
            continue
        parts.append(
            f"{name} {kernel.max_weight:.2f}@{kernel.max_weight_position:.1f}"
            f"→{kernel.min_weight:.2f}±{kernel.min_weight_distance:.1f}"
        )
    return ", ".join(parts)
