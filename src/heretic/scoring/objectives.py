"""Objectives besides refusals and KL: plug-ins that score each trial, minimized, maximized or only reported.

An objective is any object with a `name`, a default `direction` and a `score` method:

    class MyObjective:
        name = "my-objective"                  # its name when --objectives gives it as module:Name (a table's name wins)
        direction = "minimize"                  # or "maximize", or "report" (shown, never optimized)
        full_responses = True                   # optional: it needs whole responses to the harmful prompts (early
                                                # stopping goes off); "compliant": whole ones that are not refusals
        default_prompts = PromptSet(...)        # optional: its own prompts when its table names none

        class Settings(pydantic.BaseModel):     # optional: validates the own keys of [objectives.NAME]
            weight: float = 1.0

        def __init__(self, settings): ...       # optional argument: the validated Settings (or the dict of keys)
        def setup(self, context): ...           # optional: once per scored model, before its first score
        def fingerprint(self, settings): ...    # optional: what else its scores depend on among the settings
                                                # (e.g. --benchmark-tasks), for the checkpoint fingerprint
        def score(self, trial) -> float: ...    # once per trial (and once for the original model)

`trial` is a `TrialOutputs`: the harmful evaluation prompts and their responses (already generated for
the refusal count: free), their refusal verdicts and generated token counts, the trial's refusals and KL,
and the responses to the objective's own prompts when its table (or its `default_prompts`) names some (one more
generation per trial).
`context` is an `ObjectiveContext`: the settings, the objective's table, its prompts, the engine and evaluator.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel, ValidationError

from ..config import ObjectiveTable, PromptSet, Settings, objective_key
from ..errors import HereticError
from ..model.generation import Engine
from ..prompts import Prompt, load_prompts, prompts_digest
from .evaluator import Evaluator, RefusalCount
from .refusals import _takes_argument, import_file, normalize_response

ENTRY_POINT_GROUP = "heretic.objectives"
DIRECTIONS = ("minimize", "maximize", "report")


@dataclass
class TrialOutputs:
    """What an objective scores: one trial's (or the original model's) outputs."""

    prompts: list[Prompt]  # the harmful evaluation prompts
    responses: list[str]  # their greedy responses
    verdicts: list[bool]  # True: refusal
    token_counts: list[int]  # generated tokens per response
    refusals: int
    kl: float
    own_prompts: list[Prompt] = field(default_factory=list)  # the objective's own prompts (its table's `prompts`)
    own_responses: list[str] = field(default_factory=list)


@dataclass
class ObjectiveContext:
    """What an objective's `setup` receives."""

    name: str
    settings: Settings
    table: ObjectiveTable
    options: Any  # the validated own settings (an instance of the objective's Settings model, else a dict)
    prompts: list[Prompt] | None
    engine: Engine
    evaluator: Evaluator


@runtime_checkable
class Objective(Protocol):
    name: str  # shown when --objectives names it by its spec (a table's name wins)
    direction: str

    def score(self, trial: TrialOutputs) -> float: ...


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


def builtin_objectives() -> dict[str, Callable[..., Any]]:
    from .builtin_objectives import Benchmark, Degeneracy, Moralizing, OverRefusal, ResponseLength

    return {
        "response-length": ResponseLength,
        "moralizing": Moralizing,
        "degeneracy": Degeneracy,
        "benchmark": Benchmark,
        "over-refusal": OverRefusal,
    }


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
    factory, source = find_factory(spec)
    options = validate_options(name, factory, table.own_settings())
    try:
        objective = factory(options) if _takes_argument(factory) else factory()
    except Exception as error:  # noqa: BLE001 - user code
        raise HereticError(f"Creating the objective {name} ({spec}) failed: {type(error).__name__}: {error}.") from None
    if not callable(getattr(objective, "score", None)):
        raise HereticError(f"The objective {name} ({spec}) has no method score(trial) -> float; see README, Objectives.")
    direction = table.direction or getattr(objective, "direction", None)
    if direction not in DIRECTIONS:
        raise HereticError(
            f"The objective {name} has direction {direction!r}; set direction = minimize, maximize or report in [objectives.{name}]."
        )
    own = table.prompts if table.prompts is not None else getattr(objective, "default_prompts", None)
    prompts = load_prompts(own, settings.system_prompt) if isinstance(own, PromptSet) else None
    digest = hashlib.sha256(source.read_bytes()).hexdigest() if source is not None else None
    reads = _call_named(name, spec, "fingerprint", objective, settings)
    name = display_name(name, table, objective)
    return LoadedObjective(name, str(direction), objective, table, options, prompts, digest, reads)


def _call_named(name: str, spec: str, what: str, objective: Any, argument: Any) -> Any:
    """The objective's optional method `what`(argument) (None without it), its exceptions one sentence."""
    method = getattr(objective, what, None)
    if not callable(method):
        return None
    try:
        return method(argument)
    except HereticError:
        raise
    except Exception as error:  # noqa: BLE001 - user code
        raise HereticError(f"The objective {name} ({spec}) failed in {what}(): {type(error).__name__}: {error}.") from None


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


def find_factory(spec: str) -> tuple[Any, Path | None]:
    """(class or factory, source file or None) of a built-in name, an entry point, module:Name or file.py:Name."""
    builtins = builtin_objectives()
    if spec in builtins:
        return builtins[spec], None
    if ":" not in spec:
        for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if entry.name == spec:
                try:
                    return entry.load(), None
                except Exception as error:  # noqa: BLE001 - user code
                    raise HereticError(
                        f"Loading the objective entry point {spec} failed: {type(error).__name__}: {error}."
                    ) from None
        known = ", ".join(sorted(builtins) + sorted(e.name for e in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)))
        raise HereticError(f"Unknown objective {spec!r}; use one of {known}, package.module:Name or path/to/file.py:Name.")
    location, _, attribute = spec.rpartition(":")
    module, source = import_location(location, spec)
    factory = getattr(module, attribute, None)
    if factory is None:
        raise HereticError(f"The objective module {location} has no attribute {attribute!r}.")
    return factory, source


def import_location(location: str, spec: str) -> tuple[Any, Path | None]:
    """The module of "path/to/file.py" or "package.module", and its file when given as a path."""
    if not location.endswith(".py"):
        try:
            return importlib.import_module(location), None
        except ImportError as error:
            raise HereticError(f"Cannot import the objective module {location!r} of {spec} ({error}).") from None
    path = Path(location).expanduser()
    if not path.is_file():
        raise HereticError(f"The objective file {path} does not exist.")
    try:
        module = import_file(path, "heretic_user_objective")
    except Exception as error:  # noqa: BLE001 - user code
        raise HereticError(f"Importing the objective file {path} failed: {type(error).__name__}: {error}.") from None
    return module, path


def setup_objectives(objectives: list[LoadedObjective], settings: Settings, evaluator: Evaluator) -> None:
    """Call each objective's optional `setup(context)` once."""
    for loaded in objectives:
        setup = getattr(loaded.objective, "setup", None)
        if callable(setup):
            context = ObjectiveContext(
                loaded.name, settings, loaded.table, loaded.options, loaded.prompts, evaluator.engine, evaluator
            )
            _call(loaded, "setup", setup, context)


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
        value = _call(loaded, "score", loaded.objective.score, outputs)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise HereticError(f"The objective {loaded.name} returned {value!r}; score() must return a finite number.")
        values[loaded.name] = float(value)
    return values


def _call(loaded: LoadedObjective, what: str, method: Callable[..., Any], argument: Any) -> Any:
    """A method of the user's objective, its exceptions turned into one sentence."""
    try:
        return method(argument)
    except HereticError:
        raise
    except Exception as error:  # noqa: BLE001 - user code
        raise HereticError(f"The objective {loaded.name} failed in {what}(): {type(error).__name__}: {error}.") from None


def contains_any(text: str, phrases: list[str]) -> bool:
    """Whether the normalized text contains one of the (normalized) phrases."""
    normalized = normalize_response(text)
    return any(phrase in normalized for phrase in phrases)
