"""The search space: how a trial's ablation parameters are sampled."""

from __future__ import annotations

import optuna

from ..ablation.parameters import AblationParameters, ComponentKernel

# Range of the sampled max_weight, for every component. A lower MLP bound that lets the search switch
# MLP ablation off (-0.25, clamped at 0) gave a lower mean hypervolume on the benchmark (BENCHMARKS.md).
MIN_MAX_WEIGHT = 0.8
MAX_MAX_WEIGHT = 1.5


def suggest_parameters(trial: optuna.Trial, num_layers: int, components: list[str], mlp_off: bool = False) -> AblationParameters:
    """Sample one ablation. Ranges in layers: direction index in [0.4, 0.9] of the stack, peak in the
    last 40%, reach D in [1, 0.6 (L-1)], Wmin a fraction of W. With `mlp_off`, a categorical "mlp.ablate"
    can switch the MLP's kernel off (W = Wmin = 0; its other parameters are still sampled, then unused)."""
    last = num_layers - 1
    scope = trial.suggest_categorical("direction_scope", ["global", "per-layer"])
    index = trial.suggest_float("direction_index", 0.4 * last, 0.9 * last)
    kernels: dict[str, ComponentKernel] = {}
    for component in components:
        weight = trial.suggest_float(f"{component}.max_weight", MIN_MAX_WEIGHT, MAX_MAX_WEIGHT)
        position = trial.suggest_float(f"{component}.max_weight_position", 0.6 * last, float(last))
        fraction = trial.suggest_float(f"{component}.min_weight_fraction", 0.0, 1.0)
        distance = trial.suggest_float(f"{component}.min_weight_distance", 1.0, max(1.0, 0.6 * last))
        kernels[component] = ComponentKernel(weight, position, fraction * weight, distance)
    if mlp_off and "mlp" in kernels and not trial.suggest_categorical("mlp.ablate", [True, False]):
        kernels["mlp"] = ComponentKernel(0.0, kernels["mlp"].max_weight_position, 0.0, kernels["mlp"].min_weight_distance)
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
