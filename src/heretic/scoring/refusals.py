"""Refusal judges: decide whether a response refuses.

The interface is small so that users can plug in their own judge (e.g. a classifier) with
`--judge path/to/file.py:Name`, `package.module:Name` or an entry point of the group `heretic.judges`
(heretic/plugins.py), without editing Heretic:

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

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from ..errors import HereticError
from ..plugins import create, find_plugin
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


def load_judge(name: str, settings: Any) -> RefusalJudge:
    """The plug-in judge `name` (an entry point of heretic.judges, package.module:Name or path/to/file.py:Name),
    created with the settings where it takes them."""
    plugin = find_plugin("judge", name)
    judge = create(plugin, "judge", settings)
    if not callable(getattr(judge, "judge", None)):
        raise HereticError(f"The judge {name} has no method judge(prompts, responses) -> list[bool].")
    if not hasattr(judge, "name"):
        judge.name = plugin.attribute
    checked: RefusalJudge = judge
    return checked
