"""What the chosen trial does on prompts the search never saw: its KL divergence on the held-out harmless prompts
and its refusals on the over-refusal prompts (harmless prompts that look harmful), measured once and kept."""

from __future__ import annotations

import statistics
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch

from heretic.choose import show_held_out_measures
from heretic.config import Settings
from heretic.export.card import _heldout_kl, _over_refusal
from heretic.export.record import heldout_kl_entry, over_refusal_entry
from heretic.model.generation import Engine
from heretic.model.loading import eos_token_ids, load_model
from heretic.prompts import Prompt, load_prompts, prompts_digest
from heretic.report.data import HeldOutKLSummary, OverRefusalCount, ReportData
from heretic.report.html import summary_section
from heretic.scoring.kl import kl_per_prompt
from heretic.scoring.objectives import load_objectives
from heretic.scoring.refusals import MarkerJudge
from heretic.session import HELDOUT_KL_ATTR, OVER_REFUSAL_ATTR, HeldOutKL, count_over_refusal, heldout_kl
from heretic.ui import console


class CountingJudge(MarkerJudge):
    """A marker judge that counts the responses it judged."""

    judged = 0

    def judge(self, prompts: list, responses: list[str]) -> list[bool]:
        self.judged += len(responses)
        return super().judge(prompts, responses)


class ScalingAblator:
    """Stands in for the adapters: a trial's `parameters` scale the final norm's weight (the original: 1)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.weight = model.model.norm.weight
        self.original = self.weight.detach().clone()
        self.calls: list[str] = []

    def reset(self) -> None:
        self.calls.append("reset")
        with torch.no_grad():
            self.weight.copy_(self.original)

    def apply(self, parameters: float, directions: object) -> None:
        self.calls.append("apply")
        with torch.no_grad():
            self.weight.copy_(self.original * parameters)


@pytest.fixture(scope="module")
def engine(tiny_models: dict[str, Path]) -> Engine:
    loaded = load_model(str(tiny_models["llama"]), dtypes=["float32"])
    return Engine(loaded.model, loaded.tokenizer, eos_token_ids(loaded), batch_size=8)


def fake_session(engine: Engine, judge: MarkerJudge, study: optuna.Study | None, **settings: object) -> SimpleNamespace:
    values = {
        "harmless_heldout_prompts": "bundled:harmless_heldout[:6]",
        "max_response_length": 6,
        **settings,
    }
    return SimpleNamespace(
        settings=Settings.model_validate(values),
        engine=engine,
        judge=judge,
        evaluator=SimpleNamespace(objectives=[], on_responses=None),
        ablator=ScalingAblator(engine.model),
        directions=None,
        study=study,
        heldout_kl={},
        heldout_kl_evaluator=None,
        over_refusals={},
        over_refusal_evaluator=None,
    )


def test_heldout_kl_is_measured_per_prompt_kept_in_the_study_and_not_measured_again(engine: Engine) -> None:
    study = optuna.create_study()
    session = fake_session(engine, CountingJudge(["zz"]), study)
    session.ablator.apply(0.5, None)  # trial 4 applied, as `restore` leaves it
    kl = heldout_kl(session, 4, 0.5)  # type: ignore[arg-type]
    assert kl is not None and len(kl.values) == 6 and session.ablator.calls[-2:] == ["reset", "apply"]
    prompts = load_prompts(session.settings.harmless_heldout_prompts, session.settings.system_prompt)
    trial = engine.first_logprobs(engine.encode(prompts))  # the trial still applied
    session.ablator.reset()
    original = engine.first_logprobs(engine.encode(prompts))
    expected = kl_per_prompt(original, trial).tolist()
    assert kl.values == pytest.approx(expected, rel=1e-5) and min(kl.values) > 0
    assert kl.mean == pytest.approx(statistics.fmean(expected)) and kl.median == pytest.approx(statistics.median(expected))
    assert kl.prompts == [prompt.user for prompt in prompts]
    assert [value for _, value in kl.highest(3)] == sorted(kl.values, reverse=True)[:3]
    ((key, kept),) = study.user_attrs[HELDOUT_KL_ATTR].items()
    assert kept == {"4": kl.values}

    again = fake_session(engine, CountingJudge(["zz"]), study)  # a continued run: the kept values, nothing measured
    study.set_user_attr(HELDOUT_KL_ATTR, {key: {"4": [0.5, 0.1, 0.2, 0.9, 0.3, 0.4]}})
    kept_kl = heldout_kl(again, 4, 0.5)  # type: ignore[arg-type]
    assert kept_kl is not None and (kept_kl.mean, kept_kl.median) == (pytest.approx(0.4), pytest.approx(0.35))
    assert again.ablator.calls == [] and again.heldout_kl_evaluator.base_logprobs is None
    assert heldout_kl(fake_session(engine, CountingJudge(["zz"]), None, count_heldout=False), 4, 0.5) is None  # type: ignore[arg-type]


def test_over_refusals_are_counted_for_the_original_and_the_trial_and_kept(engine: Engine) -> None:
    table = {"over-refusal": {"prompts": "bundled:over_refusal[:6]", "direction": "report"}}
    settings = Settings.model_validate({"objectives": table})
    prompts = load_prompts(settings.objectives["over-refusal"].prompts, settings.system_prompt)  # type: ignore[arg-type]
    responses = [engine.decode(tokens) for tokens in engine.generate(engine.encode(prompts), 6)]  # the original's
    # A marker some of the original's responses contain (as the judge reads them): those are its refusals.
    judges = [CountingJudge([text[i : i + 2]]) for text in responses for i in range(len(text) - 2)]
    marker = next(j.markers[0] for j in judges if j.markers and 0 < sum(j.judge(prompts, responses)) < len(responses))
    expected = sum(CountingJudge([marker]).judge(prompts, responses))
    study = optuna.create_study()
    session = fake_session(engine, CountingJudge([marker]), study, objectives=table)
    session.evaluator.objectives = load_objectives(session.settings)  # its prompts: the objective's table's
    count = count_over_refusal(session, 2, 1.0)  # type: ignore[arg-type]  # a trial that changes nothing
    assert count is not None and (count.original, count.refusals, count.n_prompts) == (expected, expected, 6)
    assert session.judge.judged > 0 and session.ablator.calls == ["reset", "apply"]
    ((key, kept),) = study.user_attrs[OVER_REFUSAL_ATTR].items()
    assert kept == {"original": expected, "2": expected}

    again = fake_session(engine, CountingJudge([marker]), study, objectives=table)
    again.evaluator.objectives = session.evaluator.objectives
    study.set_user_attr(OVER_REFUSAL_ATTR, {key: {"original": 5, "2": 1}})
    count = count_over_refusal(again, 2, 1.0)  # type: ignore[arg-type]
    assert count is not None and (count.original, count.refusals) == (5, 1)
    assert again.judge.judged == 0 and again.ablator.calls == []  # nothing counted again
    entry = over_refusal_entry(again, 2)  # type: ignore[arg-type]
    assert entry is not None and entry["spec"]["split"] == "over_refusal[:6]" and entry["refusals"] == 1
    assert "this model refused 1 (17%) and the original 5 (83%)" in " ".join(_over_refusal(entry))
    with console.capture() as captured:
        again.heldout = {None: 0, 2: 0}
        again.heldout_evaluator = SimpleNamespace(harmful=[Prompt("", "x")])  # the held-out harmful count, kept
        again.heldout_degenerate = {}
        again.heldout_kl = {2: [0.25, 0.5, 0.0, 0.125, 1.0, 0.75]}
        again.heldout_kl_evaluator = None
        again.evaluator.harmful = [None] * 4
        result = SimpleNamespace(number=2, refusals=0, refusals_text="0", kl=0.0312, search_refusals=None, verified=None)
        show_held_out_measures(again, result, 1.0)  # type: ignore[arg-type]
    printed = " ".join(captured.get().split())
    assert "Over-refusal prompts (harmless prompts that look harmful): 1/6 refusals (17%; original 5/6)" in printed
    assert "KL divergence mean" in printed and "in the search: 0.0312" in printed


def test_heldout_kl_in_the_record_card_and_report() -> None:
    kl = HeldOutKL([f"prompt {i}" for i in range(6)], [0.25, 0.5, 0.0, 0.125, 1.0, 0.75])
    prompts = [Prompt("", text) for text in kl.prompts]
    session = SimpleNamespace(
        settings=Settings(), heldout_kl={7: kl.values}, heldout_kl_evaluator=SimpleNamespace(harmless=prompts)
    )
    entry = heldout_kl_entry(session, SimpleNamespace(number=7, kl=0.0312))  # type: ignore[arg-type]
    assert entry is not None and entry["sha256"] == prompts_digest(prompts) and entry["n_prompts"] == 6
    assert entry["spec"]["split"] == "harmless_heldout"
    assert (entry["mean"], entry["median"], entry["in_search"]) == (pytest.approx(0.4375), pytest.approx(0.375), 0.0312)
    assert [row["prompt"] for row in entry["highest"]] == ["prompt 4", "prompt 5", "prompt 1", "prompt 0", "prompt 3"]
    card = " ".join(_heldout_kl(entry))
    assert "this model's KL divergence from the original was 0.4375 on average (median 0.3750), against 0.0312" in card
    assert 'Highest: "prompt 4" 1.000; "prompt 5" 0.750' in card

    data = ReportData("m", "now", "markers", 8, 2, 1.0, 4, [], [], [], None)
    data.held_out_kl = HeldOutKLSummary("bundled:harmless_heldout", 6, kl.mean, kl.median, kl.highest())
    data.over_refusal = OverRefusalCount("bundled:over_refusal", 134, 12, 3)
    page = summary_section(data)
    assert "<th>Held-out KL</th><td>mean 0.4375, median 0.3750 (6 prompts, bundled:harmless_heldout)</td>" in page
    assert "<th>Over-refusals</th><td>original 12/134, trial None 3/134" in page
    assert "id='heldout-kl-table'" in page and "<td>prompt 4</td><td class='num'>1.0000</td>" in page
