"""Settings: precedence, validation, the documented defaults file, and the command line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from heretic.cli import build_parser, flag_name, settings_from_argv
from heretic.config import PromptSet, Settings, render_default_toml

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_without_any_source() -> None:
    settings = settings_from_argv([])
    assert settings.n_trials == 200
    assert settings.n_startup_trials == 60
    assert settings.max_response_length == 100
    assert settings.harmful_prompts == PromptSet(source="bundled", split="harmful_train")


def test_precedence_default_toml_env_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "config.toml").write_text("n_trials = 11\nseed = 5\nmax_kl = 0.3\n")
    assert settings_from_argv([]).n_trials == 11  # file over default
    monkeypatch.setenv("HERETIC_N_TRIALS", "22")
    monkeypatch.setenv("HERETIC_SEED", "6")
    settings = settings_from_argv([])
    assert (settings.n_trials, settings.seed, settings.max_kl) == (22, 6, 0.3)  # env over file
    settings = settings_from_argv(["--n-trials", "33"])
    assert (settings.n_trials, settings.seed) == (33, 6)  # flag over env


def test_refusal_markers_given_alone_choose_the_marker_judge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Markers are read only by the marker judge: given without --judge they choose it, from any source;
    an explicit judge still wins."""
    assert settings_from_argv(["--refusal-markers", '["nope"]']).judge == "markers"
    assert settings_from_argv(["--refusal-markers", '["nope"]', "--judge", "rules"]).judge == "rules"
    (tmp_path / "config.toml").write_text('refusal_markers = ["nope"]\n')
    assert settings_from_argv([]).judge == "markers"
    monkeypatch.setenv("HERETIC_JUDGE", "rules")
    assert settings_from_argv([]).judge == "rules"


def test_config_flag_and_positional_model(tmp_path: Path) -> None:
    other = tmp_path / "other.toml"
    other.write_text('model = "from-file/model"\nmax_response_length = 7\n')
    settings = settings_from_argv(["--config", str(other)])
    assert settings.model == "from-file/model" and settings.max_response_length == 7
    assert settings_from_argv(["org/name"]).model == "org/name"
    assert settings_from_argv(["--model", "org/name"]).model == "org/name"


def test_prompt_set_forms(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text(
        '[harmless_prompts]\nsource = "data.csv"\nsplit = "[:10]"\ncolumn = "text"\nprefix = "Please:"\n'
    )
    settings = settings_from_argv(["--harmful-prompts", "mlabonne/harmful_behaviors:train[:400]"])
    assert settings.harmful_prompts == PromptSet(source="mlabonne/harmful_behaviors", split="train[:400]")
    assert settings.harmless_prompts.column == "text" and settings.harmless_prompts.prefix == "Please:"
    assert PromptSet.model_validate("bundled:harmful_test[:100]").split == "harmful_test[:100]"
    assert PromptSet.model_validate("prompts.txt[5:9]") == PromptSet(source="prompts.txt", split="[5:9]")


def test_list_and_bool_flags() -> None:
    settings = settings_from_argv(["--action", "save", "--action", "gguf", "--no-orthogonalize-direction"])
    assert settings.action == ["save", "gguf"] and settings.orthogonalize_direction is False
    settings = settings_from_argv(["--refusal-markers", '["nope", "no way"]'])
    assert settings.refusal_markers == ["nope", "no way"]


def _error_of(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        settings_from_argv(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return " ".join(err.split())


def test_wrong_type_names_the_key(capsys: pytest.CaptureFixture[str]) -> None:
    message = _error_of(["--n-trials", "many"], capsys)
    assert "n_trials" in message and "--n-trials" in message


def test_out_of_range_names_the_key(capsys: pytest.CaptureFixture[str]) -> None:
    message = _error_of(["--max-response-length", "0"], capsys)
    assert "max_response_length" in message and "greater than" in message


def test_unknown_toml_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.toml").write_text("n_trails = 3\n")
    message = _error_of([], capsys)
    assert "Unknown setting 'n_trails'" in message


def test_unknown_environment_variable(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HERETIC_N_TRAILS", "3")
    message = _error_of([], capsys)
    assert "n_trails" in message and "HERETIC_N_TRAILS" in message


def test_malformed_toml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.toml").write_text("n_trials = = 3\n")
    message = _error_of([], capsys)
    assert "not valid TOML" in message


def test_missing_config_file(capsys: pytest.CaptureFixture[str]) -> None:
    message = _error_of(["--config", "nowhere.toml"], capsys)
    assert "nowhere.toml does not exist" in message


def test_bad_json_list(capsys: pytest.CaptureFixture[str]) -> None:
    message = _error_of(["--refusal-markers", "[broken"], capsys)
    assert "refusal_markers" in message and "JSON" in message


def test_unknown_flag_is_rejected() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--no-such-option"])


def test_default_toml_is_in_sync() -> None:
    committed = (ROOT / "config.default.toml").read_text(encoding="utf-8")
    assert committed == render_default_toml(), "regenerate it: python -m heretic.config > config.default.toml"


def test_default_toml_loads_to_defaults(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text(render_default_toml())
    assert settings_from_argv([]) == Settings()


def test_every_field_is_a_flag_with_its_description() -> None:
    help_text = " ".join(build_parser().format_help().split())
    for name, info in Settings.model_fields.items():
        assert flag_name(name) in help_text, name
        first_words = " ".join((info.description or "").split()[:5])
        assert first_words in help_text, name


def test_every_description_is_one_sentence_of_what_the_option_is_for() -> None:
    """Details and measurements belong in docs/ and BENCHMARKS.md, not in --help."""
    for name, info in Settings.model_fields.items():
        text = " ".join((info.description or "").split())
        assert text.endswith((".", ")")) and text[0].isupper(), f"{name}: one sentence, capitalized, with its full stop"
        sentences = re.split(r"(?<!e\.g\.)(?<=[.!?])\s+(?=[A-Z])", text)
        assert len(sentences) == 1, f"{name}: one sentence, not {len(sentences)} (move the rest to docs/)"
        assert not re.search(r"\b(hypervolume|BENCHMARKS|on the benchmark|better front|seeds?\b \d)", text), name


def test_help_and_version_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from heretic.cli import main\n"
        "for argv in (['--help'], ['--version']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import on --help'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--max-response-length" in result.stdout and "heretic 0.1.0" in result.stdout


def test_every_action_name_has_one_registered_handler() -> None:

    from heretic.config import BUILTIN_ACTIONS
    from heretic.export.actions import ACTIONS

    assert tuple(ACTIONS) == BUILTIN_ACTIONS  # the same names, in the same (menu) order
    assert all(action.label and callable(action.handler) for action in ACTIONS.values())


def test_layer_ranges_are_fractions_of_the_stack(capsys: pytest.CaptureFixture[str]) -> None:
    settings = settings_from_argv(["--direction-index-range", "[0.4, 1]", "--peak-position-range", "[0.3, 1.0]"])
    assert settings.direction_index_range == [0.4, 1.0] and settings.peak_position_range == [0.3, 1.0]
    for option in ("--direction-index-range", "--peak-position-range"):
        for bad in ("[0.9, 0.4]", "[0.5, 0.5]", "[-0.1, 0.9]", "[0.4, 1.2]", "[0.4]", "[0.1, 0.2, 0.3]"):
            with pytest.raises(SystemExit):
                settings_from_argv([option, bad])
            assert "fractions of the last layer" in capsys.readouterr().err


def test_direction_positions_are_distinct_negative_offsets(capsys: pytest.CaptureFixture[str]) -> None:
    assert settings_from_argv(["--direction-positions", "[-5, -1]"]).direction_positions == [-5, -1]
    for bad in ("[0]", "[-1, -1]", "[2, -1]"):
        with pytest.raises(SystemExit):
            settings_from_argv(["--direction-positions", bad])
        assert "direction" in capsys.readouterr().err


DEVICE_MAP = {"model.embed_tokens": "cpu", "model.layers": "cuda:1", "model.norm": 0, "lm_head": "disk"}
DEVICE_MAP_TABLE = '[device_map]\n"model.embed_tokens" = "cpu"\n"model.layers" = "cuda:1"\n"model.norm" = 0\nlm_head = "disk"\n'


def test_device_map_takes_a_json_object_from_every_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A JSON object {"module": device}, as --help documents it, is kept as canonical JSON text (GPU indices as
    integers) from the command line, the environment and a config table; names and strategies stay as given."""
    canonical = json.dumps(DEVICE_MAP)
    assert settings_from_argv(["--device-map", json.dumps(DEVICE_MAP)]).device_map == canonical
    assert settings_from_argv(["--device-map", '{"": "disk"}']).device_map == '{"": "disk"}'
    assert settings_from_argv(["--device-map", ' {"lm_head":"1", "":"CPU"} ']).device_map == '{"lm_head": 1, "": "cpu"}'
    assert Settings.model_validate({"device_map": DEVICE_MAP}).device_map == canonical  # a reproduction record
    for name in ("auto", "balanced", "balanced_low_0", "sequential", "cpu", "cuda", "cuda:1", "mps", "xpu", "xpu:0"):
        assert settings_from_argv(["--device-map", name]).device_map == name
    (tmp_path / "config.toml").write_text(DEVICE_MAP_TABLE)
    assert settings_from_argv([]).device_map == canonical
    # An object from a higher source replaces the config file's; the two are not merged.
    assert settings_from_argv(["--device-map", '{"": "cpu"}']).device_map == '{"": "cpu"}'
    monkeypatch.setenv("HERETIC_DEVICE_MAP", '{"": "mps"}')
    assert settings_from_argv([]).device_map == '{"": "mps"}'
    assert settings_from_argv(["--device-map", '{"": "cpu"}']).device_map == '{"": "cpu"}'
    monkeypatch.delenv("HERETIC_DEVICE_MAP")
    (tmp_path / "config.toml").write_text('device_map = { "" = "cpu" }\n')
    assert settings_from_argv([]).device_map == '{"": "cpu"}'


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ('{"lm_head": "meta"}', "'meta' \\(for 'lm_head'\\) is not a device modules can be placed on; use \"cpu\", \"disk\""),
        ('{"": "gpu"}', "'gpu' \\(for the whole model\\) is not a device"),
        ('{"lm_head": -1}', "-1 \\(for 'lm_head'\\) is not a device"),
        ('{"lm_head": 1.5}', "1.5 \\(for 'lm_head'\\) is not a device"),
        ('{"lm_head": true}', "True \\(for 'lm_head'\\) is not a device"),
        ("{}", "the JSON object names no module"),
        ("{cpu", "'{cpu' is not valid JSON \\(Expecting property name .*\\); write an object like"),
        ("gpu", "'gpu' is neither a strategy \\(auto, balanced, balanced_low_0, sequential\\) nor a device"),
        ("meta", "'meta' is neither a strategy"),
        ("disk", "'disk' is neither a strategy.*JSON object"),
    ],
)
def test_device_map_refuses_what_accelerate_cannot_place(value: str, problem: str, capsys: pytest.CaptureFixture[str]) -> None:
    message = _error_of(["--device-map", value], capsys)
    assert re.search(f"Invalid setting 'device_map'.*: .*{problem}", message), message


def test_device_map_in_a_config_file_of_another_type_is_one_sentence(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.toml").write_text("device_map = [0, 1]\n")
    assert "give a strategy or device name, or a JSON object" in _error_of([], capsys)
    (tmp_path / "config.toml").write_text('[device_map]\nlm_head = "meta"\n')
    assert "'meta' (for 'lm_head') is not a device" in _error_of([], capsys)


def test_a_text_setting_may_start_with_a_brace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Text settings keep their text: a system prompt that starts with "{" is not read as JSON."""
    assert settings_from_argv(["--system-prompt", "{role}: be brief."]).system_prompt == "{role}: be brief."
    monkeypatch.setenv("HERETIC_RESPONSE_PREFIX", '{"answer": ')
    assert settings_from_argv([]).response_prefix == '{"answer": '
    assert settings_from_argv(["--response-prefix", "none"]).response_prefix is None
