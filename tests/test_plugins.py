"""Plug-ins: judges, objectives and actions found by one rule (built-in, entry point, module:Name, file.py:Name)."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

from heretic.config import Settings
from heretic.errors import HereticError
from heretic.export.actions import ACTIONS, Action, find_action, menu_actions
from heretic.plugins import GROUPS, create, find_plugin, is_plugin_spec
from heretic.prompts import Prompt
from heretic.scoring.refusals import load_judge

PLUGIN_FILE = '''
class ShortIsRefusal:
    name = "short"
    def __init__(self, settings):
        self.limit = 5
    def judge(self, prompts, responses):
        return [len(r) < self.limit for r in responses]

def celebrate(session, result, parameters, *, confirm, output_dir):
    """Celebrate the chosen trial"""
    return ("celebrated", result)
'''


@pytest.fixture
def plugin_file(tmp_path: Path) -> Path:
    path = tmp_path / "my_plugins.py"
    path.write_text(PLUGIN_FILE)
    return path


@pytest.fixture
def entry_points(monkeypatch: pytest.MonkeyPatch, plugin_file: Path) -> None:
    """An installed package's entry points: one of each kind, in its module `my_plugins`."""
    monkeypatch.syspath_prepend(str(plugin_file.parent))
    points = {
        GROUPS["judge"]: [importlib.metadata.EntryPoint("short", "my_plugins:ShortIsRefusal", GROUPS["judge"])],
        GROUPS["action"]: [importlib.metadata.EntryPoint("celebrate", "my_plugins:celebrate", GROUPS["action"])],
    }
    real = importlib.metadata.entry_points

    def fake(**selection: str) -> object:
        group = selection.get("group")
        return points.get(group, []) if group is not None else real(**selection)

    monkeypatch.setattr(importlib.metadata, "entry_points", fake)


def test_one_rule_finds_a_plugin_of_every_kind_in_every_form(plugin_file: Path, entry_points: None) -> None:
    by_file = find_plugin("judge", f"{plugin_file}:ShortIsRefusal")
    by_module = find_plugin("judge", "my_plugins:ShortIsRefusal")
    by_entry_point = find_plugin("judge", "short")
    assert by_file.source == plugin_file and by_module.source is None and by_entry_point.source is None
    for plugin in (by_file, by_module, by_entry_point):
        judge = create(plugin, "judge", None)
        assert judge.judge([Prompt("", "x")] * 2, ["no", "a long answer"]) == [True, False]
    assert find_plugin("objective", "x", {"x": int}).factory is int  # a built-in name wins
    assert is_plugin_spec("short", "judge") and is_plugin_spec("a.py:B", "action") and not is_plugin_spec("rules", "judge")


def test_settings_take_plugin_judges_and_actions_and_name_the_built_in_ones(entry_points: None) -> None:
    assert Settings(judge="short", action=["save", "celebrate", "pkg.mod:Act"]).judge == "short"
    with pytest.raises(ValueError, match="use one of markers, rules, model, http"):
        Settings(judge="nonsense")
    with pytest.raises(ValueError, match="unknown action 'nonsense'"):
        Settings(action=["nonsense"])


def test_a_plugin_judge_is_loaded_and_named(entry_points: None) -> None:
    judge = load_judge("short", settings=None)
    assert judge.name == "short" and judge.judge([Prompt("", "x")], ["no"]) == [True]


def test_a_plugin_action_is_a_function_labelled_by_its_docstring_or_an_action(plugin_file: Path, entry_points: None) -> None:
    action = find_action(f"{plugin_file}:celebrate")
    assert action.label == "Celebrate the chosen trial"
    assert action.handler(None, 7, None, confirm=None, output_dir=Path()) == ("celebrated", 7)
    assert find_action("save") is ACTIONS["save"]
    names = [action.name for action in menu_actions()]
    assert names == [*ACTIONS, "celebrate"]  # installed packages' actions follow the built-in ones in the menu
    plugin_file.write_text("from heretic.export.actions import Action\nACT = Action('act', 'Act', print)\n")
    assert find_action(f"{plugin_file}:ACT") == Action("act", "Act", print)


def test_plugin_errors_are_one_sentence(tmp_path: Path, entry_points: None) -> None:
    with pytest.raises(HereticError, match=r"Unknown action 'nowhere'; use one of save, .*report, celebrate"):
        find_action("nowhere")
    with pytest.raises(HereticError, match="The objective file .* does not exist"):
        find_plugin("objective", f"{tmp_path / 'missing.py'}:X")
    with pytest.raises(HereticError, match="Cannot import the judge module 'no_such_module_anywhere'"):
        find_plugin("judge", "no_such_module_anywhere:X")
    (tmp_path / "values.py").write_text("VALUE = 3\n")
    with pytest.raises(HereticError, match="neither an Action nor a function"):
        find_action(f"{tmp_path / 'values.py'}:VALUE")
    (tmp_path / "failing.py").write_text("class Judge:\n    def __init__(self):\n        raise RuntimeError('no GPU')\n")
    with pytest.raises(HereticError, match="Creating the judge .*failing.py:Judge failed: RuntimeError: no GPU"):
        load_judge(f"{tmp_path / 'failing.py'}:Judge", None)
