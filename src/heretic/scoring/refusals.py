"""Refusal judges: decide whether a response refuses.

The interface is small so that users can plug in their own judge (e.g. a classifier) with
`--refusal-scorer path/to/file.py:Name` or `package.module:Name`, without editing Heretic:

    class MyJudge:
        name = "my-judge"
        def __init__(self, settings): ...                      # optional argument
        def judge(self, prompts, responses) -> list[bool]: ... # True = refusal
        def decided(self, partial_response) -> bool: ...       # optional: True once the partial
                                                                # response is certainly a refusal
        def verdict_so_far(self, partial_response): ...        # optional, instead of decided: True or
                                                                # False once the verdict is fixed, else None

`prompts` are `heretic.prompts.Prompt` (fields `system`, `user`); responses are decoded text.
`decided` and `verdict_so_far` let generation stop early; they must only answer when every
continuation of the partial response would get that verdict. A judge with neither sees
full-length responses.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..errors import HereticError
from ..prompts import Prompt


@runtime_checkable
class RefusalJudge(Protocol):
    name: str

    def judge(self, prompts: list[Prompt], responses: list[str]) -> list[bool]: ...


def thresholded_verdicts(
    scores: Callable[[list[Prompt], list[str]], list[float]], threshold: float, prompts: list[Prompt], responses: list[str]
) -> list[bool]:
    """Verdicts of a judge that scores how much a response refuses: an empty response is a refusal (it gives
    nothing) and is not scored; another is a refusal when its score exceeds `threshold`."""
    verdicts = [not response.strip() for response in responses]
    asked = [i for i, empty in enumerate(verdicts) if not empty]
    for index, score in zip(asked, scores([prompts[i] for i in asked], [responses[i] for i in asked])):
        verdicts[index] = score > threshold
    return verdicts


def normalize_response(text: str) -> str:
    """Lower case, markdown emphasis removed, typographic apostrophes unified, whitespace collapsed."""
    text = text.lower().replace("*", "")
    text = text.replace("\u2019", "'").replace("\u2018", "'").replace("\u02bc", "'")
    return " ".join(text.split())


class MarkerJudge:
    """A refusal is an empty response, or one whose normalized text contains a refusal marker."""

    name = "markers"

    def __init__(self, markers: list[str]) -> None:
        self.markers = [normalize_response(marker) for marker in markers if marker.strip()]

    def is_refusal(self, response: str) -> bool:
        if not response.strip():
            return True
        return self._has_marker(normalize_response(response))

    def _has_marker(self, normalized: str) -> bool:
        return any(marker in normalized for marker in self.markers)

    def judge(self, prompts: list[Prompt], responses: list[str]) -> list[bool]:
        return [self.is_refusal(response) for response in responses]

    def decided(self, partial_response: str) -> bool:
        # A marker in a prefix stays in every continuation: normalization acts character by character,
        # except whitespace collapsing, which keeps a marker's single spaces.
        return self._has_marker(normalize_response(partial_response))


def import_file(path: Path, prefix: str) -> Any:
    """The module of the Python file `path` (a user's plug-in), registered as `prefix`_<hash of its path>;
    whatever the file raises while it runs is raised."""
    module_name = f"{prefix}_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def load_judge(spec: str, settings: Any) -> RefusalJudge:
    """Import a user's judge from "path/to/file.py:Name" or "package.module:Name" and instantiate it."""
    location, _, attribute = spec.rpartition(":")
    if not location or not attribute:
        raise HereticError(f"The refusal scorer {spec!r} must look like path/to/file.py:Name or package.module:Name.")
    if location.endswith(".py"):
        path = Path(location).expanduser()
        if not path.is_file():
            raise HereticError(f"The refusal scorer file {path} does not exist.")
        try:
            module = import_file(path, "heretic_user_scorer")
        except Exception as error:  # noqa: BLE001 - user code
            raise HereticError(f"Importing the refusal scorer {path} failed: {type(error).__name__}: {error}.") from None
    else:
        try:
            module = importlib.import_module(location)
        except ImportError as error:
            raise HereticError(f"Cannot import the refusal scorer module {location!r} ({error}).") from None
    factory = getattr(module, attribute, None)
    if factory is None:
        raise HereticError(f"The refusal scorer module {location} has no attribute {attribute!r}.")
    try:
        judge = factory(settings) if _takes_argument(factory) else factory()
    except Exception as error:  # noqa: BLE001 - user code
        raise HereticError(f"Creating the refusal scorer {spec} failed: {type(error).__name__}: {error}.") from None
    if not callable(getattr(judge, "judge", None)):
        raise HereticError(f"The refusal scorer {spec} has no method judge(prompts, responses) -> list[bool].")
    if not hasattr(judge, "name"):
        judge.name = attribute
    checked: RefusalJudge = judge
    return checked


def _takes_argument(factory: Any) -> bool:
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self"]
    return len(positional) >= 1
