"""Verification: the search front's trials counted again on whole responses, within a budget, kept in the study."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from tiny import PROMPT_FLAGS

from heretic import verify
from heretic.scoring.rules import RuleJudge
from heretic.search.checkpoint import open_storage
from heretic.search.pareto import TrialResult, VerifiedCount, pareto_front, preference_order, select, with_verified

FILLER = "The process has several parts, and each of them depends on the tools at hand and on the setting. " * 4
LATE_DECLINE = "Sure, here is an overview of the topic. " + FILLER + "However, I cannot provide instructions for this."
LATE_LECTURE = "Sure! " + FILLER + "Hacking into accounts is illegal and harmful. It is important to respect privacy."
ANSWERS = [
    "Sure, here is how.\n1. Open the file.\n2. " + FILLER + "I cannot guarantee that it works everywhere.",
    "Here's the code:\n```python\nimport os\n```\n" + FILLER + "I can't provide support for misuse of it.",
    "To pick a lock, you need a tension wrench. " + FILLER + "I won't go into the legal side.",
]


@pytest.mark.parametrize("response", [LATE_DECLINE, LATE_LECTURE])
def test_whole_rules_call_a_refusal_after_a_compliant_opening_a_refusal(response: str) -> None:
    assert len(response) > 300
    assert not RuleJudge().is_refusal(response)
    assert RuleJudge(whole=True).is_refusal(response)


@pytest.mark.parametrize("response", ANSWERS)
def test_whole_rules_keep_an_answer_with_a_disclaimer_after_its_content(response: str) -> None:
    assert not RuleJudge(whole=True).is_refusal(response)


def test_whole_rules_only_add_refusals_and_never_stop_a_compliance_early() -> None:
    whole = RuleJudge(whole=True)
    assert whole.is_refusal("I'm sorry, but I can't help with that.")
    assert whole.verdict_so_far("I'm sorry, but I can't help with that.") is True
    assert RuleJudge().verdict_so_far(LATE_DECLINE[:320]) is False
    assert whole.verdict_so_far(LATE_DECLINE[:320]) is None  # a compliance within the window may still turn


def result(number: int, refusals: int, kl: float, seconds: float = 1.0) -> TrialResult:
    return TrialResult(number, refusals, kl, False, seconds, {})


def test_the_front_in_the_order_the_choice_prefers_it() -> None:
    front = pareto_front([result(0, 0, 0.9), result(1, 2, 0.3), result(2, 5, 0.1), result(3, 9, 0.05)])
    order = preference_order(front, "fewest-refusals", 0.5, 0, None)
    assert [r.number for r in order] == [1, 2, 3, 0]
    assert order[0] == select(front, "fewest-refusals", 0.5, 0)


def test_verified_counts_replace_the_search_counts_and_can_change_the_front() -> None:
    results = [result(0, 1, 0.1), result(1, 3, 0.2), result(2, 4, 0.3)]
    assert [r.number for r in pareto_front(results)] == [0]
    shown = pareto_front(with_verified(results, {0: VerifiedCount(9, 2, 1.0)}))
    assert [(r.number, r.refusals, r.search_refusals, r.degenerate) for r in shown] == [(1, 3, None, None), (0, 9, 1, 2)]


class FakeCount:
    """A count that takes `seconds` of a fake clock, or is stopped when it would run past what it is given."""

    def __init__(self, seconds: float) -> None:
        self.now, self.seconds, self.counted = 0.0, seconds, []

    def clock(self) -> float:
        return self.now

    def __call__(self, trial: TrialResult, given: float) -> VerifiedCount | None:
        if self.seconds > given:
            self.now += given
            return None
        self.now += self.seconds
        self.counted.append(trial.number)
        return VerifiedCount(trial.refusals + 1, 0, self.seconds)


@pytest.mark.parametrize(("budget", "counted"), [(10.0, [4, 2, 7, 1]), (2.5, [4, 2]), (1.5, [4]), (0.5, [])])
def test_the_budget_is_respected_and_trials_are_counted_in_order(budget: float, counted: list[int]) -> None:
    pending = [result(number, 0, 0.1) for number in (4, 2, 7, 1)]
    count = FakeCount(1.0)
    done, spent, left = verify.verify_in_order(pending, budget, count, [], count.clock)
    assert count.counted == counted == list(done)
    assert spent <= budget and left == [4, 2, 7, 1][len(counted) :]


def test_the_time_of_earlier_counts_tells_whether_the_next_fits() -> None:
    count = FakeCount(1.0)
    done, spent, left = verify.verify_in_order([result(3, 0, 0.1)], 2.0, count, [3.0], count.clock)
    assert not done and spent == 0.0 and left == [3]


def test_the_budget_is_a_share_of_the_trials_time() -> None:
    assert verify.budget_seconds([result(0, 0, 0.1, 30.0), result(1, 0, 0.2, 70.0)], 0.2) == pytest.approx(20.0)


# A judge that refuses late: a response that goes on past LATE characters is a refusal. Its verdict is fixed
# (compliance) once that many characters exist, so the search, which stops there, never sees a refusal.
LATE_JUDGE = """
LATE = 12

class LateJudge:
    name = "late"

    def judge(self, prompts, responses):
        return [len(response) > LATE for response in responses]

    def verdict_so_far(self, partial):
        return False if len(partial) >= LATE else None
"""


def search_flags(tmp_path: Path, *extra: str) -> list[str]:
    judge = tmp_path / "late_judge.py"
    judge.write_text(LATE_JUDGE)
    return [
        *PROMPT_FLAGS,
        "--judge",
        f"{judge}:LateJudge",
        "--max-response-length",
        "8",
        "--verify-response-length",
        "24",
        "--batch-size",
        "8",
        "--n-trials",
        "5",
        "--n-startup-trials",
        "3",
        "--no-cut-hopeless-trials",
        "--no-count-heldout",
        "--max-kl",
        "1000",
        "--dtypes",
        "float32",
        "--headless",
        "--checkpoint-dir",
        str(tmp_path / "checkpoints"),
        *extra,
    ]


def the_study(tmp_path: Path) -> optuna.Study:
    (journal,) = (tmp_path / "checkpoints").glob("*.jsonl")
    return optuna.load_study(study_name="heretic", storage=open_storage(journal))


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The trial numbers counted on whole responses, in order."""
    calls: list[int] = []
    whole_counter = verify.whole_counter

    def counting(*args: object) -> verify.CountFn:
        count = whole_counter(*args)  # type: ignore[arg-type]

        def recorded(trial: TrialResult, seconds: float) -> VerifiedCount | None:
            calls.append(trial.number)
            return count(trial, seconds)

        return recorded

    monkeypatch.setattr(verify, "whole_counter", counting)
    return calls


@pytest.mark.slow
def test_a_late_refusing_judge_changes_the_front_once_verified_and_a_resumed_run_counts_nothing_again(
    tiny_models: dict[str, Path], tmp_path: Path, counted: list[int], capsys: pytest.CaptureFixture[str]
) -> None:
    from heretic.cli import main

    main([str(tiny_models["llama"]), *search_flags(tmp_path, "--verify-budget", "1000")])
    first = capsys.readouterr().out
    study = the_study(tmp_path)
    results = [TrialResult(t.number, t.user_attrs["refusals"], t.user_attrs["kl"], False, 0.0, {}) for t in study.trials]
    assert all(r.refusals == 0 for r in results)  # the search never reads far enough to see the refusals
    (cheap,) = pareto_front(results)
    assert counted == [cheap.number]
    verified, _ = verify.stored_verified(study, next(iter(study.user_attrs[verify.VERIFIED_ATTR])))
    assert verified[cheap.number].refusals > 0  # the whole responses refuse
    shown = pareto_front(with_verified(results, verified))
    assert [r.number for r in shown] != [cheap.number]  # the front changed ...
    chosen = select(shown, "fewest-refusals", 1000, 0)
    assert chosen.number != cheap.number and f"Chosen trial {chosen.number}:" in first  # ... and so did the choice
    assert "✓" in first and "Refusals on whole responses" in first

    main([str(tiny_models["llama"]), *search_flags(tmp_path, "--verify-budget", "1000")])
    again = capsys.readouterr().out
    assert counted == [cheap.number]  # kept in the study: nothing counted again
    assert f"Chosen trial {chosen.number}:" in again and "✓" in again


@pytest.mark.slow
def test_a_spent_budget_verifies_nothing_more(
    tiny_models: dict[str, Path], tmp_path: Path, counted: list[int], capsys: pytest.CaptureFixture[str]
) -> None:
    from heretic.cli import main

    main([str(tiny_models["llama"]), *search_flags(tmp_path, "--verify-budget", "1e-9")])
    out = " ".join(capsys.readouterr().out.split())  # as printed, whatever the terminal's width wrapped
    study = the_study(tmp_path)
    key = next(iter(study.user_attrs[verify.VERIFIED_ATTR]))
    verified, spent = verify.stored_verified(study, key)
    # The search's generation rate tells that no count fits: none is started.
    assert not verified and counted == [] and spent == 0.0 and "not verified within --verify-budget 1e-09" in out
    main([str(tiny_models["llama"]), *search_flags(tmp_path, "--verify-budget", "0")])
    assert counted == [] and "✓" not in capsys.readouterr().out


def test_the_first_count_is_estimated_from_the_search_generation_rate() -> None:
    study = optuna.create_study(directions=["minimize", "minimize"])
    for tokens, seconds in ((100, 1.0), (300, 2.0), (None, 1.0), (400, 1.0)):
        trial = study.ask()
        trial.set_user_attr("seconds", seconds)
        if tokens is not None:
            trial.set_user_attr("tokens", tokens)
        study.tell(trial, [0.0, 0.0])
    assert verify.first_estimate(study, 1500) == pytest.approx(1500 / 150)  # rates 100, 150, 400 tokens/s
    assert verify.first_estimate(optuna.create_study(), 1500) is None


def test_verified_counts_are_kept_by_what_made_them() -> None:
    from heretic.config import Settings

    keys = {
        verify.verify_key(Settings(**changes))  # type: ignore[arg-type]
        for changes in ({}, {"verify_response_length": 200}, {"verify_judge": "markers"}, {"verify_budget": 0.5})
    }
    assert len(keys) == 3  # the budget decides how many trials are counted, not what a count is
    study = optuna.create_study(directions=["minimize", "minimize"])
    counts = {3: VerifiedCount(4, 1, 2.5)}
    verify.store_verified(study, "k", counts, 3.0)
    assert verify.stored_verified(study, "k") == (counts, 3.0) and verify.stored_verified(study, "other") == ({}, 0.0)


def test_the_outputs_say_which_counts_are_verified_and_show_both() -> None:
    from types import SimpleNamespace

    from heretic.config import Settings
    from heretic.export.card import _verified
    from heretic.export.record import verified_entry
    from heretic.report.data import study_report_data
    from heretic.report.html import summary_section, verified_text
    from heretic.search.tables import front_table
    from heretic.ui import console

    study = optuna.create_study(directions=["minimize", "minimize"])
    for refusals, kl in ((1, 0.1), (3, 0.2)):
        trial = study.ask()
        for key, value in dict(parameters={}, refusals=refusals, kl=kl, seconds=1.0).items():
            trial.set_user_attr(key, value)
        study.tell(trial, [refusals, kl])
    verified = {0: VerifiedCount(9, 2, 1.0)}
    data = study_report_data(study, "m", chosen=1, verified=verified, judge="rules", n_prompts=16, num_layers=4)
    assert data.front == [1, 0] and data.trial(0).verified == 9 and data.trial(0).refusals == 1
    assert "trials 0 were counted again" in verified_text(data)
    data.chosen = 0
    assert "9 (on whole responses, 2 degenerate; in the search 1)/16 refusals" in summary_section(data)

    (shown,) = with_verified([result(0, 1, 0.1)], verified)
    session = SimpleNamespace(settings=Settings(verify_response_length=200))
    entry = verified_entry(session, shown)  # type: ignore[arg-type]
    assert entry == {"response_length": 200, "judge": "rules", "search_refusals": 1, "degenerate": 2}
    card = " ".join(_verified(entry))
    assert "counted on whole responses (up to 200 tokens, by the rules judge" in card and "counted 1. 2 of" in card
    with console.capture() as captured:
        console.print(front_table([shown, result(1, 3, 0.2)], 16))
    table = captured.get()
    assert "9/16 ✓" in table and "in the" in table and "degenerate" in table


def test_the_verify_judge_is_the_search_judge_reading_whole_responses_unless_another_is_named() -> None:
    from types import SimpleNamespace

    from heretic.config import Settings
    from heretic.errors import HereticError
    from heretic.scoring.refusals import MarkerJudge

    rules = SimpleNamespace(settings=Settings(), judge=RuleJudge())
    judge = verify.verify_judge(rules)  # type: ignore[arg-type]
    assert isinstance(judge, RuleJudge) and judge.whole and not rules.judge.whole
    markers = SimpleNamespace(settings=Settings(judge="markers"), judge=MarkerJudge(["sorry"]))
    assert verify.verify_judge(markers) is markers.judge  # type: ignore[arg-type]  # it reads what it is given
    markers.settings = Settings(judge="markers", verify_judge="rules")
    assert isinstance(judge := verify.verify_judge(markers), RuleJudge) and judge.whole  # type: ignore[arg-type]
    markers.settings = Settings(judge="markers", verify_judge="http")
    with pytest.raises(HereticError, match="--judge-url"):
        verify.verify_judge(markers)  # type: ignore[arg-type]
