"""Plug-ins: judges, objectives and actions, all found by one rule.

A plug-in is named on the command line or in the config file as one of
- a built-in name (`rules`, `moralizing`, `save`, ...);
- the name of an entry point in the group `heretic.judges`, `heretic.objectives` or `heretic.actions` of an
  installed package (`[project.entry-points."heretic.judges"] my-judge = "my_package.judges:MyJudge"`);
- `package.module:Name`, an importable module's attribute;
- `path/to/file.py:Name`, an attribute of a local file (imported under a name derived from its path).

What the named object must provide depends on its kind: docs/judges.md describes each with an example.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .errors import HereticError

Kind = Literal["judge", "objective", "action"]
GROUPS: dict[Kind, str] = {"judge": "heretic.judges", "objective": "heretic.objectives", "action": "heretic.actions"}


@dataclass(frozen=True)
class Plugin:
    """A plug-in found: the object named (a class or a function) and, for `file.py:Name`, its file."""

    name: str  # as given
    factory: Any
    source: Path | None = None

    @property
    def attribute(self) -> str:
        """The name of the object itself (`Name` of `module:Name`; the entry point's or built-in's name)."""
        return self.name.rpartition(":")[2]


def entry_point_names(kind: Kind) -> list[str]:
    """The names of the installed packages' entry points of this kind, sorted."""
    return sorted(entry.name for entry in importlib.metadata.entry_points(group=GROUPS[kind]))


def is_plugin_spec(name: str, kind: Kind) -> bool:
    """Whether `name` names a plug-in rather than a built-in: `module:Name`, `file.py:Name` or an entry point."""
    return ":" in name or name in entry_point_names(kind)


def find_plugin(kind: Kind, name: str, builtins: Mapping[str, Any] | None = None) -> Plugin:
    """The plug-in `name` of this kind: a built-in, an entry point, `package.module:Name` or `path/to/file.py:Name`."""
    builtins = builtins or {}
    if name in builtins:
        return Plugin(name, builtins[name])
    if ":" not in name:
        for entry in importlib.metadata.entry_points(group=GROUPS[kind]):
            if entry.name == name:
                try:
                    return Plugin(name, entry.load())
                except Exception as error:  # noqa: BLE001 - user code
                    raise HereticError(
                        f"Loading the {kind} entry point {name} failed: {type(error).__name__}: {error}."
                    ) from None
        known = ", ".join([*builtins, *entry_point_names(kind)])
        raise HereticError(
            f"Unknown {kind} {name!r}; use one of {known or 'the installed ones'}, package.module:Name or path/to/file.py:Name."
        )
    location, _, attribute = name.rpartition(":")
    if not location or not attribute:
        raise HereticError(f"The {kind} {name!r} must look like path/to/file.py:Name or package.module:Name.")
    module, source = import_location(kind, location)
    factory = getattr(module, attribute, None)
    if factory is None:
        raise HereticError(f"The {kind} module {location} has no attribute {attribute!r}.")
    return Plugin(name, factory, source)


def import_location(kind: Kind, location: str) -> tuple[Any, Path | None]:
    """The module of "path/to/file.py" (and that file) or of "package.module" (and None)."""
    if not location.endswith(".py"):
        try:
            return importlib.import_module(location), None
        except ImportError as error:
            raise HereticError(f"Cannot import the {kind} module {location!r} ({error}).") from None
    path = Path(location).expanduser()
    if not path.is_file():
        raise HereticError(f"The {kind} file {path} does not exist.")
    try:
        return import_file(path, f"heretic_user_{kind}"), path
    except Exception as error:  # noqa: BLE001 - user code
        raise HereticError(f"Importing the {kind} file {path} failed: {type(error).__name__}: {error}.") from None


def import_file(path: Path, prefix: str) -> Any:
    """The module of the Python file `path`, registered as `prefix`_<hash of its path>; whatever the file
    raises while it runs is raised."""
    module_name = f"{prefix}_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def takes_argument(factory: Any) -> bool:
    """Whether `factory` (a class or function) takes a positional argument (the settings it is created with)."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self"]
    return len(positional) >= 1


def create(plugin: Plugin, kind: Kind, argument: Any) -> Any:
    """The plug-in's object: `factory(argument)` where it takes one, else `factory()`; its errors one sentence."""
    try:
        return plugin.factory(argument) if takes_argument(plugin.factory) else plugin.factory()
    except HereticError:
        raise
    except Exception as error:  # noqa: BLE001 - user code
        raise HereticError(f"Creating the {kind} {plugin.name} failed: {type(error).__name__}: {error}.") from None
