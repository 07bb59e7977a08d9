"""The study fingerprint: identical settings give the identical fingerprint across versions, so
existing checkpoints keep resuming."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import torch

from heretic.config import (
    RETIRED_FINGERPRINT_ENTRIES,
    Role,
    Settings,
    field_extra,
    field_roles,
    fields_with,
    fingerprint_entry,
    plain,
    variant_settings,
)
from heretic.prompts import Prompt
from heretic.search import checkpoint
from heretic.search.runner import SearchSetup
from heretic.search.study import derived_entries, study_fingerprint

PROMPT_SETS = {
    name: [Prompt("You are a helpful assistant.", f"{name} {index}") for index in range(3)]
    for name in ("harmful", "harmless", "harmful_eval", "harmless_eval")
}


def fake_loaded(gguf_file: Path | None = None) -> SimpleNamespace:
    source = SimpleNamespace(name="org/model", gguf_file=gguf_file, display_name="model")
    return SimpleNamespace(source=source, dtype=torch.bfloat16)


def test_fingerprint_of_default_settings_is_pinned() -> None:
    # Changed on purpose five times: the default judge became `rules`, then its rules revision 2, then the full
    # ablation became exact (full_normalization_exact), then the directions were read at the template's last five
    # tokens (direction_positions), then rules revision 3; each a new search.
    values = study_fingerprint(Settings(), fake_loaded(), PROMPT_SETS, "")
    assert checkpoint.fingerprint(values) == "88e47fb7d44f63f398350593937f1dc9296c348842c4f5af10fe3a18cb91e048"
    # The earlier defaults differ from today's only in what they name: a search started under one resumes with it
    # (under the rules judge, as long as the rules revision is the same: these pins are under revision 3).
    values = study_fingerprint(Settings(direction_positions=[-1]), fake_loaded(), PROMPT_SETS, "")
    assert checkpoint.fingerprint(values) == "d3692ad94f492b6483f1666234fb459cbf4e0ba3104c23c7eefbb8194107a192"
    values = study_fingerprint(Settings(full_normalization_exact=False, direction_positions=[-1]), fake_loaded(), PROMPT_SETS, "")
    assert checkpoint.fingerprint(values) == "2f62bc58c448df79a4c3be30abe1cd4c0b21e5515696e7bf08c5a0c325c38d46"


def test_fingerprint_of_changed_settings_is_pinned(tmp_path: Path) -> None:
    # With the read positions searches had before they became a setting: these fingerprints are those searches'.
    earlier = {"direction_positions": [-1]}
    settings = Settings(model_revision="abc", judge="x.py:J", seed=7, row_normalization="pre", **earlier)
    values = study_fingerprint(settings, fake_loaded(), PROMPT_SETS, "<think>\n\n</think>\n\n")
    # (multivariate TPE, which this pin once also changed, is retired: searches have had univariate TPE since)
    assert checkpoint.fingerprint(values) == "5ad829f185b7a40eacc44ca2ef63308d00bcde17b0572d9e7c047676d364eccd"
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"0123456789")
    values = study_fingerprint(Settings(**earlier), fake_loaded(gguf), PROMPT_SETS, "")
    assert checkpoint.fingerprint(values) == "14e351760cd04b49be52de37ceb093fb6ed843b5426be4fac8ba3620764916f7"


def test_every_setting_has_a_role() -> None:
    """Each field is either score (fingerprinted) or run (local to a run); search and override only refine them."""
    for name in Settings.model_fields:
        roles = field_roles(name)
        assert len(roles & {Role.score, Role.run}) == 1, f"{name} needs exactly one of the roles score or run (config.tags)"
        assert Role.search not in roles or Role.score in roles, f"{name}: a search setting changes scores"
        assert "fingerprint" not in field_extra(name) or Role.score in roles, f"{name}: only score settings are fingerprinted"


def test_fingerprint_has_one_entry_per_score_setting() -> None:
    values = study_fingerprint(Settings(), fake_loaded(), PROMPT_SETS, "")
    derived = derived_entries(Settings(), fake_loaded(), PROMPT_SETS, "")
    by_value = {name for name in fields_with(Role.score) if fingerprint_entry(name) is None}
    retired = set(RETIRED_FINGERPRINT_ENTRIES)  # removed settings, kept at the value searches had since
    assert set(values) == by_value | retired | {fingerprint_entry(name) for name in fields_with(Role.score)} - {None}
    assert set(derived) == set(values) - by_value - retired  # every derived entry comes from some score setting
    assert not set(derived) & by_value  # ... and never takes the place of a value
    assert values["seed"] == 42 and values["row_normalization"] == "full"


def test_search_setup_takes_the_search_settings() -> None:
    session_parts = {"ablator", "evaluator", "directions", "num_layers", "components"}
    assert {f.name for f in dataclasses.fields(SearchSetup)} == session_parts | set(fields_with(Role.search))


def test_reproduction_overrides_are_the_override_settings() -> None:
    assert fields_with(Role.override) == [
        "model",
        "device_map",
        "max_memory",
        "cache_dir",
        "output_dir",
        "overwrite",
        "ignore_mismatches",
        "log_level",
    ]


def test_direction_and_component_options_enter_the_fingerprint_only_when_changed() -> None:
    default = checkpoint.fingerprint(study_fingerprint(Settings(), fake_loaded(), PROMPT_SETS, ""))
    same = Settings(
        direction_positions=[-5, -4, -3, -2, -1],
        kl_tokens=1,
        direction_index_range=[0.4, 0.9],
        peak_position_range=[0.6, 1.0],
    )
    assert checkpoint.fingerprint(study_fingerprint(same, fake_loaded(), PROMPT_SETS, "")) == default
    seen = {default}
    defaults = {"full_normalization_exact": True, "direction_positions": [-5, -4, -3, -2, -1]}
    changes: list[dict[str, object]] = [
        {"direction_positions": [-2, -1]},
        {"kl_tokens": 4},
        {"direction_index_range": [0.4, 1.0]},
        {"peak_position_range": [0.4, 1.0]},
    ]
    for change in changes:
        values = study_fingerprint(Settings(**change), fake_loaded(), PROMPT_SETS, "")  # type: ignore[arg-type]
        assert values["judge"]["variant"] == defaults | change  # type: ignore[index]
        seen.add(checkpoint.fingerprint(values))
    assert len(seen) == 5
    # The exact full ablation enters as a change from what earlier searches had (the approximation), and only
    # where the ablation is full.
    earliest = Settings(full_normalization_exact=False, direction_positions=[-1])
    assert "variant" not in str(study_fingerprint(earliest, fake_loaded(), PROMPT_SETS, "")["judge"])
    pre = study_fingerprint(Settings(row_normalization="pre"), fake_loaded(), PROMPT_SETS, "")
    assert "full_normalization_exact" not in str(pre["judge"])
    # Fused MoE experts keep the approximation whatever the setting says: their searches keep their fingerprint.
    approximated = study_fingerprint(Settings(full_normalization_exact=False), fake_loaded(), PROMPT_SETS, "")
    fused = study_fingerprint(Settings(), fake_loaded(), PROMPT_SETS, "", fused_experts=True)
    assert fused == approximated


# A changed value for every score setting, after the settings it needs to be read (a judge's own options only
# under that judge). A new score setting fails the test
# below until it is given one here, so that a setting that forgets to enter the fingerprint cannot go unseen.
SCORE_CHANGES: dict[str, tuple[dict[str, object], object]] = {
    "model_revision": ({}, "v2"),
    "max_response_length": ({}, 64),
    "orthogonalize_direction": ({}, False),
    "winsorization_quantile": ({}, 0.99),
    "direction_positions": ({}, [-1]),
    "row_normalization": ({}, "pre"),
    "full_normalization_exact": ({}, False),
    "full_normalization_rank": ({}, 2),
    "refusal_markers": ({"judge": "markers"}, ["nope"]),
    "objectives": ({}, {"length": {"objective": "response-length"}}),
    "judge": ({}, "markers"),
    "judge_model": ({"judge": "http", "judge_url": "http://localhost:1/v1"}, "other"),
    "judge_threshold": ({"judge": "model", "judge_model": "missing-judge-folder"}, 0.5),
    "judge_url": ({"judge": "http", "judge_url": "http://localhost:1/v1"}, "http://localhost:2/v1"),
    "n_startup_trials": ({}, 10),
    "seed": ({}, 7),
    "sampler_kl_floor": ({}, 0.02),
    "direction_index_range": ({}, [0.2, 0.9]),
    "peak_position_range": ({}, [0.5, 1.0]),
    "kl_tokens": ({}, 4),
    "cut_hopeless_trials": ({}, False),
}
# Score settings that enter through what they produce, changed in what the fingerprint reads: the loaded
# model, its dtype, the prompt sets and the prefilled response prefix.
PRODUCED_BY = {
    "model": "model",
    "dtypes": "dtype",
    "quantization": "dtype",
    "system_prompt": "prompts",
    "harmful_prompts": "prompts",
    "harmless_prompts": "prompts",
    "harmful_eval_prompts": "prompts",
    "harmless_eval_prompts": "prompts",
    "thinking_tags": "response_prefix",
    "response_prefix": "response_prefix",
    "detect_response_prefix": "response_prefix",
}


def digest(
    settings: Settings, loaded: SimpleNamespace | None = None, prompts: dict[str, list[Prompt]] | None = None, prefix: str = ""
) -> str:
    values = study_fingerprint(settings, loaded or fake_loaded(), prompts or PROMPT_SETS, prefix)
    return checkpoint.fingerprint(values)


def test_changing_any_score_setting_changes_the_fingerprint() -> None:
    assert set(SCORE_CHANGES) | set(PRODUCED_BY) == set(fields_with(Role.score)), "give each score setting a change"
    assert {name: fingerprint_entry(name) for name in PRODUCED_BY} == PRODUCED_BY
    for name, (context, value) in SCORE_CHANGES.items():
        before, after = digest(Settings(**context)), digest(Settings(**{**context, name: value}))  # type: ignore[arg-type]
        assert before != after, f"changing {name} leaves the fingerprint as it was"
    base = digest(Settings())
    other_model = SimpleNamespace(
        source=SimpleNamespace(name="org/other", gguf_file=None, display_name="other"), dtype=torch.bfloat16
    )
    other_dtype = SimpleNamespace(source=fake_loaded().source, dtype=torch.float32)
    quantized = SimpleNamespace(source=fake_loaded().source, dtype=torch.bfloat16, quantization="bnb-4bit")
    other_prompts = {**PROMPT_SETS, "harmful_eval": PROMPT_SETS["harmful_eval"][:2]}
    changed = [
        digest(Settings(), other_model),
        digest(Settings(), other_dtype),
        digest(Settings(), quantized),
        digest(Settings(), prompts=other_prompts),
        digest(Settings(), prefix="<think>\n\n</think>\n\n"),
    ]
    assert base not in changed and len(set(changed)) == len(changed)


def test_variant_settings_are_derived_from_their_tags() -> None:
    earlier = variant_settings()
    assert earlier["direction_positions"] == [-1] and earlier["full_normalization_exact"] is False
    assert earlier["kl_tokens"] == Settings().kl_tokens  # its default: what every search had before it existed
    assert all(fingerprint_entry(name) == "judge" for name in earlier)  # through the scoring identity
    # At the earlier values, no variant enters: the fingerprint is the one searches had before these settings.
    values = study_fingerprint(
        Settings(**{name: plain(value) for name, value in earlier.items()}), fake_loaded(), PROMPT_SETS, ""
    )
    assert "variant" not in str(values["judge"])
