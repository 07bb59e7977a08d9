"""Loading, setting up and scoring the objectives of `--objectives` (the plug-in interface they implement is
in objective_api.py; built-in ones in builtin_objectives.py, the others found by heretic/plugins.py)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from ..config import ObjectiveTable, PromptSet, Settings, objective_key
from ..errors import HereticError
from ..plugins import create, find_plugin
from ..prompts import Prompt, load_prompts, prompts_digest
from .builtin_objectives import Benchmark, Degeneracy, Moralizing, OverRefusal, ResponseLength
from .evaluator import Evaluator, RefusalCount
from .objective_api import DIRECTIONS, Objective, ObjectiveContext, TrialOutputs

__all__ = ["LoadedObjective", "Objective", "ObjectiveContext", "TrialOutputs", "load_objectives", "score_objectives"]

# The objectives shipped with Heretic, by the name --objectives gives them.
BUILTIN_OBJECTIVES: dict[str, Callable[..., Any]] = {
    "response-length": ResponseLength,
    "moralizing": Moralizing,
    "degeneracy": Degeneracy,
    "benchmark": Benchmark,
    "over-refusal": OverRefusal,
}


@dataclass
class LoadedObjective:
    """An objective as configured: its name (the table's), direction, own prompts and identity."""

    name: str
    direction: str
    objective: Any
    table: ObjectiveTable
    options: Any
    prompts: list[Prompt] | None
    source_digest: str | None  # sha256 of the plug-in's file, when it was loaded from one
    reads: object = None  # its `fingerprint(settings)`, when it has one

    @property
    def full_responses(self) -> str | None:
        """Which responses to the harmful prompts it needs whole: "all", "compliant" (those that are not refusals:
        a response may still stop once it is certainly a refusal) or None (it scores its own prompts' responses)."""
        wanted = getattr(self.objective, "full_responses", False)
        if self.prompts is not None or not wanted:
            return None
        return "compliant" if wanted == "compliant" else "all"

    def identity(self) -> dict[str, object]:
        """What enters the checkpoint fingerprint: a search resumes only under the same objectives."""
        return {
            "use": self.table.use or self.name,
            "direction": self.direction,
            "settings": _plain(self.options),
            "prompts": prompts_digest(self.prompts) if self.prompts is not None else None,
            "source": self.source_digest,
        } | ({"reads": self.reads} if self.reads is not None else {})


def _plain(options: Any) -> object:
    return options.model_dump(mode="json") if isinstance(options, BaseModel) else options


def load_objectives(settings: Settings) -> list[LoadedObjective]:
    """Every objective of `settings.objectives`, loaded and checked, in the order configured."""
    objectives = [load_objective(name, table, settings) for name, table in settings.objectives.items()]
    names = [objective.name for objective in objectives]
    for name in names:
        if names.count(name) > 1:
            raise HereticError(f"Two objectives are named {name!r}; give each its own table name [objectives.NAME].")
    return objectives


def display_name(key: str, table: ObjectiveTable, objective: Any) -> str:
    """The table's name, or the objective's own `name` when the table is only named after it (as
    `--objectives package.module:Name` names it)."""
    own = getattr(objective, "name", None)
    if table.use is not None and key == objective_key(table.use) and isinstance(own, str) and own.strip():
        return own.strip()
    return key


def load_objective(name: str, table: ObjectiveTable, settings: Settings) -> LoadedObjective:
    """Import, configure and check the objective of the table `[objectives.<name>]`."""
    spec = table.use or name
    plugin = find_plugin("objective", spec, BUILTIN_OBJECTIVES)
    options = validate_options(name, plugin.factory, table.own_settings())
    objective = create(plugin, "objective", options)
    if not callable(getattr(objective, "score", None)):
        raise HereticError(f"The objective {name} ({spec}) has no method score(trial) -> float; see docs/judges.md.")
    direction = table.direction or getattr(objective, "direction", None)
    if direction not in DIRECTIONS:
        raise HereticError(
            f"The objective {name} has direction {direction!r}; set direction = minimize, maximize or report in [objectives.{name}]."
        )
    own = table.prompts if table.prompts is not None else getattr(objective, "default_prompts", None)
    prompts = load_prompts(own, settings.system_prompt) if isinstance(own, PromptSet) else None
    digest = hashlib.sha256(plugin.source.read_bytes()).hexdigest() if plugin.source is not None else None
    reads = _call_named(name, spec, "fingerprint", objective, settings)
    name = display_name(name, table, objective)
    return LoadedObjective(name, str(direction), objective, table, options, prompts, digest, reads)


def _call_named(name: str, spec: str, what: str, objective: Any, argument: Any) -> Any:
    """The objective's optional method `what`(argument) (None without it), its exceptions one sentence."""
    method = getattr(objective, what, None)
    return _call_user(f"{name} ({spec})", what, method, argument) if callable(method) else None


def validate_options(name: str, factory: Any, own: dict[str, Any]) -> Any:
    """The table's own keys, validated by the objective's `Settings` model; a dict when it has none."""
    model = getattr(factory, "Settings", None)
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return own
    try:
        return model.model_validate(own)
    except ValidationError as error:
        first = error.errors()[0]
        key = ".".join(str(part) for part in first["loc"]) or "settings"
        message = str(first["msg"]).removeprefix("Value error, ").rstrip(".")
        if first["type"] == "extra_forbidden":
            message = f"is not a setting of this objective (it has: {', '.join(model.model_fields)})"
        raise HereticError(f"Invalid setting '{key}' in [objectives.{name}]: {message}.") from None


def setup_objectives(objectives: list[LoadedObjective], settings: Settings, evaluator: Evaluator) -> None:
    """Call each objective's optional `setup(context)` once."""
    for loaded in objectives:
        setup = getattr(loaded.objective, "setup", None)
        if callable(setup):
            context = ObjectiveContext(
                loaded.name, settings, loaded.table, loaded.options, loaded.prompts, evaluator.engine, evaluator
            )
            _call_user(loaded.name, "setup", setup, context)


def score_objectives(objectives: list[LoadedObjective], evaluator: Evaluator, count: RefusalCount, kl: float) -> dict[str, float]:
    """Each objective's value for the model state the evaluator has just scored (count: its full refusal count)."""
    values: dict[str, float] = {}
    for loaded in objectives:
        own_prompts = loaded.prompts or []
        outputs = TrialOutputs(
            prompts=evaluator.harmful,
            responses=count.responses,
            verdicts=count.verdicts,
            token_counts=count.token_counts,
            refusals=count.refusals,
            kl=kl,
            own_prompts=own_prompts,
            own_responses=evaluator.responses(own_prompts) if own_prompts else [],
        )
        value = _call_user(loaded.name, "score", loaded.objective.score, outputs)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise HereticError(f"The objective {loaded.name} returned {value!r}; score() must return a finite number.")
        values[loaded.name] = float(value)
    return values


def _call_user(label: str, what: str, method: Callable[..., Any], argument: Any) -> Any:
    """`method(argument)` of the objective called `label`; an exception of user code becomes one sentence."""
    try:
        return method(argument)
    except HereticError:
        raise
    except Exception as error:  # noqa: BLE001 - user code
        raise HereticError(f"The objective {label} failed in {what}(): {type(error).__name__}: {error}.") from None
