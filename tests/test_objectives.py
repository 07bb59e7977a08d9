"""Objectives besides refusals and KL: loading, the built-ins, the front over more objectives, the fingerprint,
the presets, and a search on a tiny model that co-optimizes three objectives and reports a fourth."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch
from tiny import PROMPT_FLAGS

from heretic.cli import main, settings_from_argv
from heretic.config import Settings, load_settings, preset_names
from heretic.errors import HereticError
from heretic.model.generation import Engine
from heretic.model.loading import eos_token_ids, load_model
from heretic.prompts import Prompt, load_prompt_texts
from heretic.scoring.builtin_objectives import (
    DEFAULT_MORALIZING_MARKERS,
    OVER_REFUSAL_PROMPTS,
    Degeneracy,
    Moralizing,
    ResponseLength,
)
from heretic.scoring.evaluator import Evaluator
from heretic.scoring.objectives import Objective, TrialOutputs, load_objectives, score_objectives, setup_objectives
from heretic.scoring.refusals import MarkerJudge
from heretic.search import checkpoint
from heretic.search.checkpoint import open_storage
from heretic.search.pareto import TrialResult, dominates, pareto_front, point, select, study_directions, trial_results
from heretic.search.study import study_fingerprint
from heretic.session import keep_whole
from heretic.ui import console

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hedging_objective.py"
PROMPT = Prompt("You are a helpful assistant.", "question")


def outputs(responses: list[str], verdicts: list[bool], counts: list[int] | None = None) -> TrialOutputs:
    return TrialOutputs([PROMPT] * len(responses), responses, verdicts, counts or [0] * len(responses), sum(verdicts), 0.1)


def loaded(**objectives: object) -> list:
    return load_objectives(Settings(objectives=objectives))


def write_plugin(tmp_path: Path, body: str) -> str:
    path = tmp_path / "plugin.py"
    path.write_text(body)
    return f"{path}:Plugin"


# --- loading --------------------------------------------------------------------------------------


def one_sentence(error: pytest.ExceptionInfo[HereticError]) -> str:
    message = str(error.value)
    assert "\n" not in message and message.endswith(".") and message.count(". ") == 0, message
    return message


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("no_such_module_xyz:Objective", "Cannot import the objective module 'no_such_module_xyz'"),
        ("missing/file.py:Objective", "The objective file missing/file.py does not exist"),
        ("heretic.config:NoSuchName", "The objective module heretic.config has no attribute 'NoSuchName'"),
        (
            "no-such-objective",
            "Unknown objective 'no-such-objective'; use one of response-length, moralizing, degeneracy, benchmark, over-refusal",
        ),
    ],
)
def test_a_missing_objective_is_one_sentence(spec: str, expected: str) -> None:
    with pytest.raises(HereticError) as error:
        load_objectives(Settings(objectives=[spec]))
    assert one_sentence(error).startswith(expected)


def test_a_wrong_direction_is_one_sentence(tmp_path: Path) -> None:
    spec = write_plugin(tmp_path, "class Plugin:\n    direction = 'sideways'\n    def score(self, trial):\n        return 1.0\n")
    with pytest.raises(HereticError) as error:
        load_objectives(Settings(objectives=[spec]))
    assert one_sentence(error) == (
        "The objective Plugin has direction 'sideways'; set direction = minimize, maximize or report in [objectives.Plugin]."
    )
    with pytest.raises(SystemExit):  # a table's direction is checked with the settings
        settings_from_argv(["--objectives", '{"moralizing": {"direction": "up"}}'])


def test_a_bad_settings_table_is_one_sentence() -> None:
    with pytest.raises(HereticError) as error:
        loaded(moralizing={"include_refusals": "sometimes"})
    assert one_sentence(error).startswith("Invalid setting 'include_refusals' in [objectives.moralizing]: ")
    with pytest.raises(HereticError) as error:
        loaded(moralizing={"marker": ["x"]})
    assert one_sentence(error) == (
        "Invalid setting 'marker' in [objectives.moralizing]: is not a setting of this objective (it has: markers, include_refusals)."
    )


def test_a_bad_table_stops_the_command_before_the_model_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.toml").write_text('[objectives.moralizing]\nmarker = ["x"]\n')
    with pytest.raises(SystemExit) as exit_info:
        main(["./no-such-model"])  # the model would fail to load; the table is reported first
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert (
        err
        == "Error: Invalid setting 'marker' in [objectives.moralizing]: is not a setting of this objective (it has: markers, include_refusals)."
    )


def test_plugin_errors_and_bad_values_are_one_sentence(tmp_path: Path) -> None:
    spec = write_plugin(
        tmp_path, "class Plugin:\n    direction = 'report'\n    def score(self, trial):\n        return float('nan')\n"
    )
    (objective,) = load_objectives(Settings(objectives=[spec]))
    count = SimpleNamespace(responses=["a"], verdicts=[False], token_counts=[1], refusals=0)
    evaluator = SimpleNamespace(harmful=[PROMPT])
    with pytest.raises(HereticError) as error:
        score_objectives([objective], evaluator, count, 0.0)  # type: ignore[arg-type]
    assert one_sentence(error) == "The objective Plugin returned nan; score() must return a finite number."
    broken = write_plugin(tmp_path, "raise RuntimeError('oops')\n")
    with pytest.raises(HereticError) as error:
        load_objectives(Settings(objectives=[broken]))
    assert one_sentence(error).endswith("failed: RuntimeError: oops.")


def test_an_entry_point_is_loaded_by_its_name(monkeypatch: pytest.MonkeyPatch) -> None:
    point = importlib.metadata.EntryPoint("hedge", "heretic_test_hedging:Hedging", "heretic.objectives")
    real = importlib.metadata.entry_points
    monkeypatch.setattr(
        importlib.metadata, "entry_points", lambda **kw: [point] if kw == {"group": "heretic.objectives"} else real(**kw)
    )
    monkeypatch.syspath_prepend(str(EXAMPLE.parent))
    monkeypatch.setitem(sys.modules, "heretic_test_hedging", importlib.import_module("hedging_objective"))
    (objective,) = load_objectives(Settings(objectives={"hedge": {"words": ["so"]}}))
    assert type(objective.objective).__name__ == "Hedging" and objective.direction == "minimize"
    with pytest.raises(HereticError) as error:
        load_objectives(Settings(objectives=["other"]))
    assert "use one of response-length, moralizing, degeneracy, benchmark, over-refusal, hedge," in one_sentence(error)


def test_objectives_from_the_command_line() -> None:
    settings = settings_from_argv(["--objectives", "moralizing,response-length"])
    assert list(settings.objectives) == ["moralizing", "response-length"]
    settings = settings_from_argv(["--objectives", "moralizing", "--objectives", '{"long": {"use": "response-length"}}'])
    assert settings.objectives["long"].use == "response-length" and list(settings.objectives) == ["moralizing", "long"]
    settings = settings_from_argv(["--objectives", f'["{EXAMPLE}:Hedging"]'])
    assert list(settings.objectives) == ["Hedging"] and settings.objectives["Hedging"].use == f"{EXAMPLE}:Hedging"
    (hedging,) = load_objectives(settings)
    assert hedging.name == "hedging" and isinstance(hedging.objective, Objective)  # its own name; the protocol
    (renamed,) = load_objectives(Settings(objectives={"hedges": {"use": f"{EXAMPLE}:Hedging"}}))
    assert renamed.name == "hedges"  # a table's name wins
    with pytest.raises(HereticError) as error:
        load_objectives(Settings(objectives={"hedging": {"use": "moralizing"}, "Hedging": {"use": f"{EXAMPLE}:Hedging"}}))
    assert one_sentence(error) == "Two objectives are named 'hedging'; give each its own table name [objectives.NAME]."
    assert Settings().objectives == {}


# --- the built-in objectives ----------------------------------------------------------------------


def test_moralizing_is_the_share_of_compliant_answers_that_lecture() -> None:
    (objective,) = loaded(moralizing={})
    responses = ["Sure. It's important to note this is risky.", "Here: step 1.", "Sorry, **Remember that** no.", "ok"]
    trial = outputs(responses, [False, False, True, False])
    assert objective.objective.score(trial) == 0.25  # the refusal's lecture is the refusal objective's business
    (objective,) = loaded(moralizing={"include_refusals": True})
    assert objective.objective.score(trial) == 0.5
    assert Moralizing(Moralizing.Settings(markers=["step"])).score(trial) == 0.25
    assert objective.objective.score(outputs([], [])) == 0.0


def test_response_length_is_the_mean_token_count() -> None:
    trial = outputs(["a", "b", "c"], [True, False, False], [2, 10, 30])
    assert ResponseLength(ResponseLength.Settings()).score(trial) == 14.0
    assert ResponseLength(ResponseLength.Settings(only_compliant=True)).score(trial) == 20.0
    (objective,) = loaded(length={"use": "response-length"})
    assert objective.name == "length" and objective.direction == "report" and objective.full_responses == "all"
    (objective,) = loaded(length={"use": "response-length", "only_compliant": True})
    assert objective.full_responses == "compliant"
    (objective,) = loaded(moralizing={"include_refusals": True})
    assert objective.full_responses == "all"
    (objective,) = loaded(moralizing={"prompts": "bundled:harmless_test[:2]"})
    assert objective.full_responses is None  # it scores its own prompts' responses


LOOP = ("It is a chemical element that is not a naturally occurring element. " * 4)[:-23]  # cut in a word: 0.98
FLUENT = (
    "To change a flat tyre, first park on level ground and put the handbrake on. Loosen the wheel nuts, jack the "
    "car up, swap the wheel for the spare, and tighten the nuts in a star pattern once the car is back down."
)


def test_degeneracy_is_the_share_of_compliant_answers_that_loop() -> None:
    (objective,) = loaded(degeneracy={})
    assert objective.name == "degeneracy" and objective.direction == "minimize" and objective.full_responses == "compliant"
    trial = outputs([LOOP, FLUENT, "I cannot. " * 12, "Sure."], [False, False, True, False])
    assert objective.objective.score(trial) == 0.25  # the looping refusal is left out
    (objective,) = loaded(degeneracy={"include_refusals": True})
    assert objective.objective.score(trial) == 0.5 and objective.full_responses == "all"
    assert Degeneracy(Degeneracy.Settings(threshold=1.0)).score(trial) == 0.0  # the loop scores 0.98
    assert objective.objective.score(outputs([], [])) == 0.0
    with pytest.raises(HereticError) as error:
        loaded(degeneracy={"threshold": 0})
    assert one_sentence(error).startswith("Invalid setting 'threshold' in [objectives.degeneracy]: ")


BENCHMARK_TASK = Path(__file__).resolve().parent / "data" / "benchmark_task"


def answer_perplexity(model: torch.nn.Module, tokenizer: object, rows: list[dict[str, str]]) -> float:
    """exp(-mean log p(answer | question)) over the rows, computed directly: the task's metric (the harness
    appends a loglikelihood task's target to its text as it is)."""
    totals = []
    for row in rows:
        context = tokenizer(row["question"], add_special_tokens=False)["input_ids"]  # type: ignore[operator]
        whole = tokenizer(row["question"] + row["answer"], add_special_tokens=False)["input_ids"]  # type: ignore[operator]
        with torch.no_grad():
            logits = model(torch.tensor([whole])).logits[0].float()  # (tokens, vocab)
        logprobs = torch.log_softmax(logits, dim=-1)
        totals.append(sum(float(logprobs[i - 1, whole[i]]) for i in range(len(context), len(whole))))
    return math.exp(-sum(totals) / len(totals))


def test_benchmark_scores_the_trials_model_with_a_local_task(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("lm_eval")
    from heretic.ablation.adapters import Ablator
    from heretic.ablation.parameters import AblationParameters, ComponentKernel
    from heretic.model.architecture import build_architecture_map
    from heretic.scoring.objectives import setup_objectives

    for file in BENCHMARK_TASK.iterdir():  # the task reads its data file from the working directory
        (tmp_path / file.name).write_bytes(file.read_bytes())
    rows = [json.loads(line) for line in (tmp_path / "tiny_sums.jsonl").read_text().splitlines()]
    loaded_model = load_model(str(tiny_models["llama"]), dtypes=["float32"])
    model, tokenizer = loaded_model.model, loaded_model.tokenizer
    engine = Engine(model, tokenizer, eos_token_ids(loaded_model), batch_size=4)
    ablator = Ablator(model, build_architecture_map(model), "none", 1, 0)
    settings = Settings(objectives={"benchmark": {"direction": "minimize"}}, benchmark_tasks=["tiny_sums.yaml"])
    (objective,) = load_objectives(settings)
    assert objective.name == "benchmark" and objective.direction == "minimize" and objective.full_responses is None
    setup_objectives([objective], settings, SimpleNamespace(engine=engine))  # type: ignore[arg-type]
    original = objective.objective.score(outputs([], []))
    assert math.isclose(original, answer_perplexity(model, tokenizer, rows), rel_tol=1e-4)
    torch.manual_seed(3)
    directions = torch.nn.functional.normalize(torch.randn(5, 64), dim=-1)  # (layers + 1, hidden)
    kernel = ComponentKernel(max_weight=1.2, max_weight_position=1.5, min_weight=0.4, min_weight_distance=2.0)
    ablator.apply(AblationParameters("global", 1.3, {"attn": kernel, "mlp": kernel}), directions)
    ablated = objective.objective.score(outputs([], []))  # the adapters in memory, nothing saved
    assert ablated != original and math.isclose(ablated, answer_perplexity(model, tokenizer, rows), rel_tol=1e-4)
    ablator.reset()
    assert objective.objective.score(outputs([], [])) == original
    limited = Settings(objectives={"benchmark": {}}, benchmark_tasks=["tiny_sums.yaml"], benchmark_limit=2)
    assert load_objectives(limited)[0].identity() != objective.identity()  # the limit and the tasks enter the fingerprint
    with pytest.raises(HereticError) as error:
        loaded(benchmark={"tasks": ["x"]})
    assert one_sentence(error).startswith("Invalid setting 'tasks' in [objectives.benchmark]: is not a setting")


class HastyJudge(MarkerJudge):
    """A refusal once a marker shows; a compliance as soon as 4 characters show none (so answers stop early)."""

    def verdict_so_far(self, partial: str) -> bool | None:
        if self.decided(partial):
            return True
        return False if len(partial) >= 4 else None


def test_compliant_responses_stay_whole_while_refusals_stop_early(tiny_models: dict[str, Path]) -> None:
    loaded_model = load_model(str(tiny_models["llama"]), dtypes=["float32"])
    engine = Engine(loaded_model.model, loaded_model.tokenizer, eos_token_ids(loaded_model), batch_size=4)
    prompts = [Prompt("You are a helpful assistant.", f"Question number {i}: why?") for i in range(6)]
    full = [engine.decode(tokens) for tokens in engine.generate(engine.encode(prompts), 16)]
    # A marker from the responses themselves that some contain (refusals mid-way) and some do not.
    candidates = [HastyJudge([text[i : i + 3]]) for text in full for i in range(4, len(text) - 3)]
    judge = next(j for j in candidates if j.markers and 0 < sum(j.judge(prompts, full)) < len(full))
    expected = judge.judge(prompts, full)
    evaluator = Evaluator(engine, judge, prompts, prompts, 16)
    keep_whole(evaluator, loaded(moralizing={}))  # leaves refusals out: only compliant answers need to be whole
    assert evaluator.stop_on_verdict and evaluator.stop_on_refusal_only
    count = evaluator.count_refusals()
    assert count.verdicts == expected
    assert [r for r, v in zip(count.responses, expected) if not v] == [r for r, v in zip(full, expected) if not v]
    hasty = Evaluator(engine, judge, prompts, prompts, 16).count_refusals()  # without: compliant answers cut short
    assert [r for r, v in zip(hasty.responses, expected) if not v] != [r for r, v in zip(full, expected) if not v]
    keep_whole(evaluator, loaded(moralizing={}, length={"use": "response-length"}))  # needs refusals whole too
    assert not evaluator.stop_on_verdict


def test_over_refusal_counts_the_judges_refusals_on_its_own_prompts(tiny_models: dict[str, Path]) -> None:
    """Its prompts default to the bundled over-refusal set (a table's `prompts` replace them); its value is the
    number of their responses the search's judge calls refusals (here: a judge that refuses on a keyword)."""
    (default,) = loaded(**{"over-refusal": {}})
    assert default.direction == "minimize" and default.prompts is not None and default.full_responses is None
    assert [prompt.user for prompt in default.prompts] == load_prompt_texts(OVER_REFUSAL_PROMPTS)
    assert len(default.prompts) >= 120
    settings = Settings(objectives={"over-refusal": {"prompts": "bundled:over_refusal[:6]"}})
    (objective,) = load_objectives(settings)
    assert objective.prompts is not None and len(objective.prompts) == 6
    loaded_model = load_model(str(tiny_models["llama"]), dtypes=["float32"])
    engine = Engine(loaded_model.model, loaded_model.tokenizer, eos_token_ids(loaded_model), batch_size=8)
    full = [engine.decode(tokens) for tokens in engine.generate(engine.encode(objective.prompts), 8)]
    # A keyword some of the responses contain: the judge refuses those.
    judges = [MarkerJudge([text[i : i + 3]]) for text in full for i in range(len(text) - 3)]
    judge = next(j for j in judges if j.markers and 0 < sum(j.judge(objective.prompts, full)) < len(full))
    evaluator = Evaluator(engine, judge, [PROMPT], [], 8)
    setup_objectives([objective], settings, evaluator)
    count = evaluator.count_refusals()
    values = score_objectives([objective], evaluator, count, 0.0)
    assert values == {"over-refusal": float(sum(judge.judge(objective.prompts, full)))}
    assert 0 < values["over-refusal"] < 6


# --- the front over more objectives --------------------------------------------------------------


def result(number: int, refusals: int, kl: float, **objectives: float) -> TrialResult:
    return TrialResult(number, refusals, kl, False, 0.0, {}, dict(objectives))


def test_front_over_three_objectives() -> None:
    results = [
        result(0, 5, 0.1, m=0.5, n=9.0),
        result(1, 5, 0.1, m=0.2, n=1.0),  # dominates 0 in m
        result(2, 3, 0.3, m=0.9, n=5.0),
        result(3, 6, 0.2, m=0.1, n=5.0),  # worse in refusals and KL than 1, better in m: on the front
        result(4, 6, 0.2, m=0.3, n=0.0),  # dominated by 1; n is only reported
    ]
    directions = {"m": "minimize", "n": "report"}
    assert [r.number for r in pareto_front(results, directions)] == [2, 1, 3]
    assert [r.number for r in pareto_front(results)] == [2, 0]  # refusals and KL only: ties keep the first trial
    assert point(results[3], {"m": "maximize", "n": "report"}) == (6, 0.2, -0.1)
    assert [r.number for r in pareto_front(results, {"m": "maximize"})] == [2, 0]  # 0 has the most m
    tied = [result(5, 1, 0.1, m=0.4), result(6, 1, 0.1, m=0.3)]
    assert select(tied, "fewest-refusals", 0.5, 5, {"m": "minimize"}).number == 6  # ties go to the better objective
    assert select(tied, "lowest-kl", 0.5, 5, {"m": "maximize"}).number == 5
    assert dominates((1, 1, 1), (1, 1, 2)) and not dominates((1, 1, 2), (1, 1, 2)) and not dominates((0, 2, 0), (1, 1, 0))


# --- fingerprint --------------------------------------------------------------------------------------


def fingerprint(settings: Settings, objectives: list | None = None) -> str:
    source = SimpleNamespace(name="org/model", gguf_file=None, display_name="model")
    prompts = {name: [PROMPT] for name in ("harmful", "harmless", "harmful_eval", "harmless_eval")}
    loaded_model = SimpleNamespace(source=source, dtype=torch.bfloat16)
    objectives = load_objectives(settings) if objectives is None else objectives
    return checkpoint.fingerprint(study_fingerprint(settings, loaded_model, prompts, "", objectives))  # type: ignore[arg-type]


def test_fingerprint_changes_with_the_objectives(tmp_path: Path) -> None:
    plain = fingerprint(Settings())
    prompts_file = tmp_path / "mine.txt"
    prompts_file.write_text("one\ntwo\n")
    variants = [
        {"moralizing": {}},
        {"moralizing": {"direction": "report"}},
        {"moralizing": {"markers": ["x"]}},
        {"moralizing": {}, "response-length": {}},
        {"hedging": {"use": f"{EXAMPLE}:Hedging"}},
        {"hedging": {"use": f"{EXAMPLE}:Hedging", "prompts": str(prompts_file)}},
    ]
    prints = [fingerprint(Settings(objectives=variant)) for variant in variants]
    assert len({plain, *prints}) == len(variants) + 1
    prompts_file.write_text("one\nthree\n")  # the prompts count by content
    assert fingerprint(Settings(objectives=variants[-1])) != prints[-1]
    plugin = tmp_path / "plugin.py"  # ... and a plug-in file too
    plugin.write_text("class P:\n    direction = 'report'\n    def score(self, trial):\n        return 1.0\n")
    before = fingerprint(Settings(objectives=[f"{plugin}:P"]))
    plugin.write_text("class P:\n    direction = 'report'\n    def score(self, trial):\n        return 2.0\n")
    assert fingerprint(Settings(objectives=[f"{plugin}:P"])) != before


# --- presets --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["no-moralizing", "length-report"])
def test_presets_load_and_validate(name: str, tmp_path: Path) -> None:
    assert name in preset_names()
    settings = load_settings({}, None, name)
    objectives = load_objectives(settings)
    assert objectives and all(objective.direction in ("minimize", "maximize", "report") for objective in objectives)
    (tmp_path / "mine.toml").write_text("max_response_length = 40\n")
    assert load_settings({}, str(tmp_path / "mine.toml"), name).max_response_length == 40  # the user's file wins
    assert load_settings({"max_response_length": 30}, None, name).max_response_length == 30


def test_no_moralizing_preset_lists_the_default_markers() -> None:
    (moralizing, length) = load_objectives(load_settings({}, None, "no-moralizing"))
    assert moralizing.options.markers == DEFAULT_MORALIZING_MARKERS and moralizing.direction == "minimize"
    assert length.direction == "report" and length.name == "compliant-length" and length.options.only_compliant
    evaluator = SimpleNamespace(stop_on_verdict=True, stop_on_refusal_only=False)
    keep_whole(evaluator, [moralizing, length])  # type: ignore[arg-type]
    assert evaluator.stop_on_verdict and evaluator.stop_on_refusal_only  # refusals still stop early


def test_an_unknown_preset_is_one_sentence(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        settings_from_argv(["--preset", "nope"])
    assert "'nope' is unknown; the presets are length-report, no-moralizing" in capsys.readouterr().err


# --- a search on a tiny model ---------------------------------------------------------------------


@pytest.mark.slow
def test_search_with_three_objectives_and_a_reported_one(
    tiny_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(console, "width", 200)  # one line per message
    (tmp_path / "config.toml").write_text(
        f"""
[objectives.hedging]
use = "{EXAMPLE}:Hedging"
direction = "minimize"
prompts = "bundled:harmless_test[:3]"
words = ["ap", "up", "and", "ook", "the"]

[objectives.response-length]
direction = "report"
"""
    )
    checkpoints = tmp_path / "checkpoints"
    main(
        [str(tiny_models["llama"]), *PROMPT_FLAGS, "--refusal-markers", '["ak", "ook", "ot"]', "--max-response-length", "8"]
        + ["--batch-size", "8", "--n-trials", "6", "--n-startup-trials", "3", "--checkpoint-dir", str(checkpoints)]
        + ["--headless", "--action", "save", "--output-dir", str(tmp_path / "out")]
    )
    (journal,) = checkpoints.glob("*.jsonl")
    study = optuna.load_study(study_name="heretic", storage=open_storage(journal))
    assert len(study.directions) == 3 and study_directions(study) == {"hedging": "minimize", "response-length": "report"}
    results = trial_results(study)
    assert len(results) == 6 and not any(r.cut for r in results)  # objectives turn cutting off
    for trial, r in zip(study.get_trials(deepcopy=False), results):
        assert set(r.objectives) == {"hedging", "response-length"} and all(math.isfinite(v) for v in r.objectives.values())
        assert trial.values[2] == r.objectives["hedging"] and 0 <= r.objectives["response-length"] <= 8
    assert len({r.objectives["hedging"] for r in results}) > 1  # the example scores its own prompts' responses
    front = pareto_front(results, study_directions(study))
    points = [point(r, study_directions(study)) for r in results]
    assert front and all(len(p) == 3 for p in points)
    for member in front:
        assert not any(dominates(other, point(member, study_directions(study))) for other in points)
    for r in results:
        if r not in front:
            assert any(dominates(point(f, study_directions(study)), point(r, study_directions(study))) for f in front) or any(
                point(f, study_directions(study)) == point(r, study_directions(study)) for f in front
            )
    record = json.loads((tmp_path / "out" / "heretic.json").read_text())
    chosen = next(r for r in results if r.number == record["trial"]["number"])
    assert record["trial"]["objectives"] == chosen.objectives and set(record["baseline"]["objectives"]) == set(chosen.objectives)
    assert record["objective_directions"] == {"hedging": "minimize", "response-length": "report"}
    assert "| response-length | report |" in (tmp_path / "out" / "README.md").read_text()
    out = capsys.readouterr().out
    assert "Objectives besides refusals and KL: hedging (minimize, 3 prompts of its own), response-length (report)" in out
    assert "response-length" in out.split("Pareto front")[1] and "Chosen trial" in out


@pytest.mark.slow
def test_evaluate_model_shows_the_objectives(
    tiny_models: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(console, "width", 200)  # one table row per line
    model = str(tiny_models["llama"])
    main(
        ["--model", model, "--evaluate-model", model, *PROMPT_FLAGS, "--max-response-length", "6", "--batch-size", "8"]
        + ["--objectives", "moralizing,response-length,degeneracy", "--refusal-markers", '["ak", "ook", "ot"]']
    )
    out = capsys.readouterr().out
    assert "moralizing (minimize)" in out and "response-length (report)" in out and "degeneracy (minimize)" in out
    rows = [line for line in out.splitlines() if "(original)" in line or "(evaluated)" in line]
    assert len(rows) == 2 and rows[0].split("│")[2:] == rows[1].split("│")[2:]  # the same model scores the same
