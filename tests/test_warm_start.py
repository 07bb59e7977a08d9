"""--warm-start: a published record's trial as the first trial of a new search, its layers mapped by fraction."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import optuna
import pytest
import torch
from tiny import PROMPT_FLAGS, SCORING_FLAGS, make_tokenizer

from heretic.ablation.parameters import AblationParameters, ComponentKernel
from heretic.cli import main
from heretic.config import Settings
from heretic.search.checkpoint import open_storage
from heretic.search.space import MIN_MAX_WEIGHT, LayerRanges
from heretic.search.warm_start import (
    RecordedTrial,
    map_distance,
    map_position,
    read_recorded_trial,
    read_recorded_trials,
    trial_params,
)
from heretic.ui import console

KERNEL = ComponentKernel(max_weight=1.2, max_weight_position=3.0, min_weight=0.6, min_weight_distance=1.5)


def test_positions_map_by_their_fraction_of_the_last_layer_and_distances_by_the_layer_count() -> None:
    assert map_position(3.0, 4, 8) == 7.0 and map_position(0.0, 4, 8) == 0.0  # the last layer stays the last
    assert math.isclose(map_position(1.5, 4, 8), 3.5) and math.isclose(map_position(14.0, 28, 48), 14.0 * 47 / 27)
    assert map_distance(1.5, 4, 8) == 3.0 and math.isclose(map_distance(6.0, 28, 48), 6.0 * 48 / 28)
    assert map_position(0.0, 1, 8) == 0.0


def test_trial_params_are_the_search_spaces_names_clamped_into_its_ranges() -> None:
    parameters = AblationParameters("global", 1.0, {"attn": KERNEL, "mlp": ComponentKernel(0.0, 0.2, 0.0, 3.0)})
    trial = RecordedTrial("record", "LlamaForCausalLM", 4, parameters)
    params, clamps = trial_params(trial, 8, ["attn", "mlp"], LayerRanges.default())
    assert params == {
        "direction_scope": "global",
        "direction_index": pytest.approx(0.4 * 7),  # 1.0 * 7/3 = 2.33 is below the range [0.4, 0.9] * 7
        "attn.max_weight": 1.2,
        "attn.min_weight_fraction": 0.5,
        "attn.max_weight_position": 7.0,
        "attn.min_weight_distance": 3.0,
        "mlp.max_weight": MIN_MAX_WEIGHT,  # a switched-off MLP (weight 0) starts at the weakest ablation searched
        "mlp.min_weight_fraction": 0.0,
        "mlp.max_weight_position": pytest.approx(0.6 * 7),  # 0.2 * 7/3 is below [0.6, 1.0] * 7
        "mlp.min_weight_distance": pytest.approx(0.6 * 7),  # 3.0 * 8/4 = 6 is beyond the reach's 0.6 * 7
    }
    assert [clamp.split()[0] for clamp in clamps] == [
        "direction_index",
        "mlp.max_weight",
        "mlp.max_weight_position",
        "mlp.min_weight_distance",
    ]
    params, clamps = trial_params(trial, 8, ["attn"], LayerRanges.default())  # no MLP here: left out
    assert "mlp.ablate" not in params and not any(name.startswith("mlp.") for name in params)


def write_record(path: Path, architecture: str = "LlamaForCausalLM", num_layers: int = 4) -> Path:
    """A minimal record that read_record accepts."""
    parameters = AblationParameters("per-layer", 2.0, {"attn": KERNEL})
    record = {
        "record_version": 1,
        "tool": {"name": "heretic", "version": "0"},
        "environment": {"libraries": {}},
        "model": {"name": "someone/tiny-7b", "architecture": architecture, "num_layers": num_layers},
        "settings": {},
        "prompt_sets": {name: {"sha256": "0"} for name in ("harmful", "harmless", "harmful_eval", "harmless_eval")},
        "directions_sha256": "0",
        "trial": {"number": 3, "parameters": parameters.to_dict()},
    }
    path.write_text(json.dumps(record))
    return path


def test_a_record_from_the_hub_or_a_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib.request

    import huggingface_hub

    record = write_record(tmp_path / "downloaded.json")
    calls = []

    def download(repo_id: str, filename: str, revision: str | None = None) -> str:
        calls.append((repo_id, filename, revision))
        return str(record)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    trial = read_recorded_trial("someone/tiny-7b")
    assert (trial.architecture, trial.num_layers, trial.parameters.kernels["attn"]) == ("LlamaForCausalLM", 4, KERNEL)
    read_recorded_trial("https://huggingface.co/someone/tiny-7b/blob/v1/heretic.json")
    assert calls == [("someone/tiny-7b", "heretic.json", None), ("someone/tiny-7b", "heretic.json", "v1")]
    opened = []

    def urlopen(url: str, timeout: float) -> io.BytesIO:
        opened.append(url)
        return io.BytesIO(record.read_bytes())

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    assert read_recorded_trial("https://example.org/results/heretic.json").parameters.direction_scope == "per-layer"
    assert opened == ["https://example.org/results/heretic.json"] and len(calls) == 2


def test_another_architecture_or_an_old_record_is_one_sentence(tmp_path: Path) -> None:
    from heretic.errors import HereticError

    record = write_record(tmp_path / "heretic.json", architecture="Qwen2ForCausalLM")
    with pytest.raises(HereticError) as error:
        read_recorded_trials([str(record)], "LlamaForCausalLM")
    assert str(error.value) == (
        f"The warm-start record {record} is of a Qwen2ForCausalLM model and this one is a LlamaForCausalLM; "
        "a warm start needs the same architecture."
    )
    old = json.loads(record.read_text())
    del old["model"]["architecture"]
    record.write_text(json.dumps(old))
    with pytest.raises(HereticError, match="predates --warm-start"):
        read_recorded_trials([str(record)], "LlamaForCausalLM")


def eight_layers(four: Path, folder: Path) -> Path:
    """The tiny model's architecture with 8 layers (random weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(four)
    config.num_hidden_layers = 8
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def search(model: Path, checkpoints: Path, *flags: str) -> optuna.Study:
    main([str(model), *PROMPT_FLAGS, *SCORING_FLAGS, "--checkpoint-dir", str(checkpoints), "--headless", *flags])
    (journal,) = checkpoints.glob("*.jsonl")
    return optuna.load_study(study_name="heretic", storage=open_storage(journal))


def test_a_4_layer_record_starts_an_8_layer_search(
    tiny_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(console, "width", 200)  # one line per message
    record = write_record(tmp_path / "heretic.json", num_layers=4)  # what a search on the 4-layer model saves
    recorded = AblationParameters.from_dict(json.loads(record.read_text())["trial"]["parameters"])
    eight = eight_layers(tiny_models["llama"], tmp_path / "eight")
    study = search(eight, tmp_path / "ck", "--n-trials", "2", "--no-count-heldout", "--warm-start", str(record))
    first, second = study.get_trials(deepcopy=False)
    assert first.state == second.state == optuna.trial.TrialState.COMPLETE
    ranges = LayerRanges.of_settings(Settings())

    def inside(value: float, low: float, high: float) -> float:
        return min(max(value, low * 7), high * 7)

    expected = {
        "direction_scope": recorded.direction_scope,
        "direction_index": inside(recorded.direction_index * 7 / 3, *ranges.direction_index),  # x' = x (8 - 1) / (4 - 1)
    }
    for name, kernel in recorded.kernels.items():
        expected |= {
            f"{name}.max_weight": kernel.max_weight,
            f"{name}.min_weight_fraction": kernel.min_weight / kernel.max_weight,
            f"{name}.max_weight_position": inside(kernel.max_weight_position * 7 / 3, *ranges.peak_position),
            f"{name}.min_weight_distance": min(max(kernel.min_weight_distance * 8 / 4, 1.0), 0.6 * 7),  # d' = d 8 / 4
        }
    sampled = {f"mlp.{name}" for name in ("max_weight", "max_weight_position", "min_weight_fraction", "min_weight_distance")}
    assert set(first.params) == set(expected) | sampled  # the record has no MLP kernel: the sampler chooses it
    for name, value in expected.items():
        assert first.params[name] == (value if isinstance(value, str) else pytest.approx(value, rel=1e-9)), name
    assert first.params["attn.max_weight_position"] == 7.0 and first.params["attn.min_weight_distance"] == 3.0
    assert second.params != first.params  # then the sampler's own trials
    out = capsys.readouterr().out
    assert f"Warm start: the trial of {record} (LlamaForCausalLM, 4 → 8 layers) runs first" in out


def test_a_warm_start_from_another_architecture_is_refused(
    tiny_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    record = write_record(tmp_path / "heretic.json", architecture="LlamaForCausalLM")
    with pytest.raises(SystemExit) as exit_info:
        search(tiny_models["qwen2"], tmp_path / "ck", "--n-trials", "1", "--warm-start", str(record))
    assert exit_info.value.code != 0
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.splitlines()[-1] == (
        f"Error: The warm-start record {record} is of a LlamaForCausalLM model and this one is a Qwen2ForCausalLM; "
        "a warm start needs the same architecture."
    )
