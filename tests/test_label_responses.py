"""bench/label_responses.py: the responses of a stored search's front, made to be labelled by reading."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from bench import label_responses
from bench.label_responses import config_name, job_done, jobs, read_rows, write_rows

TRIALS = [
    {"number": 4, "refusals": 55, "kl": 0.018, "params": {}},
    {"number": 2, "refusals": 16, "kl": 0.041, "params": {}},
    {"number": 1, "refusals": 8, "kl": 0.068, "params": {}},
]


def test_every_configuration_answers_the_harmful_prompts_and_two_the_harmless_ones() -> None:
    planned = jobs(TRIALS, harmful=80, harmless=30)
    harmful = [(config_name(trial), split, first) for trial, kind, split, first in planned if kind == "harmful"]
    harmless = [(config_name(trial), split, first) for trial, kind, split, first in planned if kind == "harmless"]
    assert harmful == [(name, "harmful_test[:80]", 0) for name in ("original", "trial4", "trial2", "trial1")]
    # the original and the strongest ablation (fewest refusals), on disjoint halves of the harmless prompts
    assert harmless == [("original", "harmless_test[:30]", 0), ("trial1", "harmless_test[30:60]", 30)]


def test_a_run_resumes_after_the_last_complete_configuration(tmp_path: Path) -> None:
    out = tmp_path / "labels" / "responses.jsonl"
    assert read_rows(out) == []
    rows = [{"id": f"original/harmful/{i:03d}", "response": "ü"} for i in range(3)]
    write_rows(out, rows)
    assert read_rows(out) == rows and not out.with_suffix(".partial").exists()
    planned = jobs(TRIALS, harmful=3, harmless=2)
    done = {row["id"] for row in read_rows(out)}
    assert [job_done(job, done) for job in planned] == [True, False, False, False, False, False]


def test_the_responses_of_a_trial_are_generated_whole_under_its_ablation(
    tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bench.harness.tools import stored_trial_parameters
    from heretic.config import Settings
    from heretic.search.space import LayerRanges, describe, suggest_parameters
    from heretic.session import prepare

    settings = Settings.model_validate(
        dict(
            model=str(tiny_models["qwen2"]),
            harmful_prompts="bundled:harmful_train[:6]",
            harmless_prompts="bundled:harmless_train[:6]",
            harmful_eval_prompts="bundled:harmful_test[:4]",
            harmless_eval_prompts="bundled:harmless_test[:4]",
            max_response_length=4,
            batch_size=8,
            dtypes=["float32"],
            checkpoint_dir=str(tmp_path / "checkpoints"),
            headless=True,
        )
    )
    session = prepare(settings, interactive=False)
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    suggest_parameters(trial, session.arch.num_layers, session.arch.components, LayerRanges.of_settings(settings))
    stored = {"number": 7, "refusals": 1, "kl": 0.5, "params": trial.params}
    monkeypatch.setattr(label_responses, "TOKENS", 6)

    original = label_responses.generate(session, None, "harmful", "harmful_test[:3]", 0)
    ablated = label_responses.generate(session, stored, "harmless", "harmless_test[3:5]", 3)
    again = label_responses.generate(session, None, "harmful", "harmful_test[:3]", 0)

    assert [row["id"] for row in original] == ["original/harmful/000", "original/harmful/001", "original/harmful/002"]
    assert [row["id"] for row in ablated] == ["trial7/harmless/003", "trial7/harmless/004"]
    assert ablated[0]["in_search"] == {"refusals": 1, "kl": 0.5} and ablated[0]["parameters"].startswith("dir ")
    assert ablated[0]["parameters"] == describe(stored_trial_parameters(session, trial.params))  # the search log's line
    assert all(row["tokens"] <= 6 and row["hit_limit"] == (row["tokens"] == 6) for row in original + ablated)
    assert again == original  # the ablation is taken off after its configuration
