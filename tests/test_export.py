"""What users take away: merged model, adapter, GGUF, card, record, reproduce, benchmarks, upload."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from heretic.cli import run
from heretic.config import Settings
from heretic.errors import HereticError
from heretic.export.save import atomic_folder

pytestmark = pytest.mark.slow

MARKERS = ["ak", "ook", "ot"]


def settings(model: Path, tmp_path: Path, **overrides) -> Settings:
    values = dict(
        model=str(model),
        harmful_prompts="bundled:harmful_train[:12]",
        harmless_prompts="bundled:harmless_train[:12]",
        harmful_eval_prompts="bundled:harmful_test[:8]",
        harmless_eval_prompts="bundled:harmless_test[:8]",
        # The evaluation set again: the held-out count must then repeat the search's and the original's.
        harmful_heldout_prompts="bundled:harmful_test[:8]",
        harmless_heldout_prompts="bundled:harmless_heldout[:8]",
        refusal_markers=MARKERS,
        max_response_length=8,
        batch_size=8,
        n_trials=4,
        n_startup_trials=2,
        dtypes=["float32"],
        checkpoint_dir=str(tmp_path / "checkpoints"),
        headless=True,
        output_dir=str(tmp_path / "out" / "model"),
    )
    values.update(overrides)
    return Settings.model_validate(values)


def sha256_of(folder: Path) -> dict[str, str]:
    return {file.name: hashlib.sha256(file.read_bytes()).hexdigest() for file in sorted(folder.glob("*.safetensors"))}


@pytest.fixture(scope="module")
def saved(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One headless run with every file-producing action on a tiny qwen2 model."""
    tmp_path = tmp_path_factory.mktemp("saved")
    run(settings(tiny_models["qwen2"], tmp_path, action=["save", "save-adapter", "gguf"], gguf_type="f16"))
    out = tmp_path / "out"
    return {
        "root": tmp_path,
        "model": out / "model",
        "adapter": out / "model-adapter",
        "gguf": out / "model.f16.gguf",
        "original": tiny_models["qwen2"],
    }


def test_merged_model_is_plain_transformers_and_reproduces_the_trial(
    saved: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    folder = saved["model"]
    files = {file.name for file in folder.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "model.safetensors", "README.md", "heretic.json"} <= files
    assert not any(name.startswith("adapter") for name in files)
    config = json.loads((folder / "config.json").read_text())
    assert "heretic" not in json.dumps(config).lower()
    record = json.loads((folder / "heretic.json").read_text())
    trial = record["trial"]
    assert not trial["refusals_is_lower_bound"]
    # Refusals and KL of the saved model, measured from scratch against the original.
    from heretic.evaluate import evaluate_model

    rows = evaluate_model(settings(saved["original"], saved["root"], evaluate_model=str(folder)))
    (_, _, refusals, kl) = rows[1]
    assert refusals == trial["refusals"]
    assert kl > 0 and kl == pytest.approx(trial["kl"], rel=0.02, abs=1e-8)
    assert f"{kl:.4g}" in " ".join(capsys.readouterr().out.split())


def test_evaluate_model_reads_kl_over_the_first_tokens_and_prints_responses(
    saved: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--kl-tokens N: the evaluated model is read on the original's own continuations, as in a search;
    --print-responses: every harmful prompt's response, with its verdict, for both models."""
    from heretic.evaluate import evaluate_model
    from heretic.ui import console

    monkeypatch.setattr(console, "width", 300)  # the table's headers on one line each, whatever the terminal

    first = evaluate_model(settings(saved["original"], saved["root"], evaluate_model=str(saved["model"])))[1][3]
    capsys.readouterr()
    over_three = evaluate_model(
        settings(saved["original"], saved["root"], evaluate_model=str(saved["model"]), kl_tokens=3, print_responses=True)
    )
    out = " ".join(capsys.readouterr().out.split())
    (_, _, _, kl_original), (_, _, _, kl) = over_three
    assert kl_original == 0.0 and kl > 0 and kl != pytest.approx(first, rel=1e-3)
    assert "first 3 tokens" in out
    assert out.count("Prompt:") == 2 * 8 and out.count("Responses:") == 2


def test_adapter_gives_the_merged_logits(saved: dict[str, Path]) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter_config = json.loads((saved["adapter"] / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(saved["original"])
    base = AutoModelForCausalLM.from_pretrained(saved["original"], dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, saved["adapter"]).eval()
    merged = AutoModelForCausalLM.from_pretrained(saved["model"], dtype=torch.float32).eval()
    tokens = torch.randint(3, 500, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        difference = (adapted(tokens).logits - merged(tokens).logits).abs().max().item()
    assert difference < 1e-4  # float32: only summation order differs


def test_gguf_export_matches_the_merged_model(saved: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(saved["model"], dtype=torch.float32).eval()
    exported = AutoModelForCausalLM.from_pretrained(
        saved["gguf"].parent, gguf_file=saved["gguf"].name, dtype=torch.float32
    ).eval()
    tokens = torch.randint(3, 500, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference, logits = merged(tokens).logits, exported(tokens).logits
    relative = ((logits - reference).abs().max() / reference.abs().max()).item()
    assert relative < 0.005  # f16 tensors


def test_card_holds_metrics_parameters_and_provenance(saved: dict[str, Path]) -> None:
    card = (saved["model"] / "README.md").read_text()
    record = json.loads((saved["model"] / "heretic.json").read_text())
    assert card.startswith("---\n") and "abliterated" in card and "uncensored" in card
    assert f"| original | {record['baseline']['refusals']} | uncorrected | 0 |" in card
    assert f"{record['trial']['kl']:.4f}" in card and "heretic --reproduce heretic.json" in card
    assert "bundled:harmful_test[:8]" in card and record["prompt_sets"]["harmful_eval"]["sha256"][:16] in card
    assert (
        record["environment"]["libraries"]["torch"] == torch.__version__.split("+")[0]
        or record["environment"]["libraries"]["torch"]
    )
    # No credential: no key naming a token or an API key (counts of tokens such as kl_tokens, and the name of the
    # environment variable holding the judge's key, aside), no Hub token value.
    keys = set(re.findall(r'"([^"]+)":', json.dumps(record)))
    secret_like = [key for key in keys if ("token" in key.lower() and not key.endswith("_tokens")) or "api_key" in key.lower()]
    assert secret_like == [] or secret_like == ["judge_api_key_env"]
    assert not re.search(r"\bhf_[A-Za-z0-9]{20,}", json.dumps(record))
    # the base model by its name, never a path of this machine; the weights by their hashes
    assert record["model"]["name"] == saved["original"].name and record["settings"]["model"] == saved["original"].name
    assert record["model"]["architecture"] == "Qwen2ForCausalLM" and record["model"]["num_layers"] == 4  # for --warm-start
    for text in (card, json.dumps(record)):
        assert str(saved["original"].parent) not in text and str(saved["root"]) not in text
    weights = record["saved"]["weights"]
    assert record["saved"]["kind"] == "merged" and list(weights) == ["model.safetensors"]
    assert weights["model.safetensors"]["sha256"] == sha256_of(saved["model"])["model.safetensors"]
    assert weights["model.safetensors"]["size"] == (saved["model"] / "model.safetensors").stat().st_size
    adapter_record = json.loads((saved["adapter"] / "heretic.json").read_text())
    assert adapter_record["saved"]["kind"] == "adapter" and list(adapter_record["saved"]["weights"]) == [
        "adapter_model.safetensors"
    ]
    # The default full ablation is exact: said in the record and the card; the adapter is a DoRA adapter.
    assert record["trial"]["ablation"] == "full, exact" and "- row normalization: full, exact" in card
    assert json.loads((saved["adapter"] / "adapter_config.json").read_text())["use_dora"] is True


def test_custom_markers_leave_the_counts_uncorrected_in_the_record_and_the_card(saved: dict[str, Path]) -> None:
    """The fixture's judge reads a custom marker list: no measured error rates, so no interval, and it says so."""
    record = json.loads((saved["model"] / "heretic.json").read_text())
    note = "uncorrected: no measured error rates for this judge"
    assert record["baseline"]["true_refusals"] == {"corrected": False, "note": note}
    assert record["trial"]["true_refusals"]["corrected"] is False and "uncorrected" in record["trial"]["true_refusals"]["note"]
    card = (saved["model"] / "README.md").read_text()
    assert "| true refusals (95 %) |" in card and f"The true-refusals column is {note}." in card


def test_the_rules_judge_counts_carry_their_corrected_interval(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """The rules judge has measured error rates: the record holds each count's estimate, interval, method and
    labelled set, and the card shows them in its results table."""
    from heretic.scoring.interval import true_count
    from heretic.scoring.judge_rates import measured_rates

    run(settings(tiny_models["qwen2"], tmp_path, judge="rules", action=["save"], n_trials=2, n_startup_trials=2))
    record = json.loads((tmp_path / "out" / "model" / "heretic.json").read_text())
    card = (tmp_path / "out" / "model" / "README.md").read_text()
    baseline, n = record["baseline"], record["baseline"]["n_prompts"]
    entry = baseline["true_refusals"]
    shipped = measured_rates({"judge": "rules"})  # src/heretic/data/judge_rates.json
    assert shipped is not None
    expected = true_count(baseline["refusals"], n, shipped.rates)
    assert entry["corrected"] is True and entry["judge"] == "rules" and entry["confidence"] == 0.95
    assert entry["estimate"] == round(expected.estimate, 2) and (entry["low"], entry["high"]) == (
        round(expected.low, 2),
        round(expected.high, 2),
    )
    assert entry["low"] <= entry["estimate"] <= entry["high"] and entry["method"].startswith("Rogan-Gladen")
    assert entry["labelled_set"] == {"model": shipped.model, "split": "test", "n": shipped.n, "description": shipped.describe()}
    original_cell = f"≈ {entry['estimate']:.0f} ({entry['low']:.0f}–{entry['high']:.0f})"
    assert f"| original | {baseline['refusals']} | {original_cell} | 0 |" in card
    trial = record["trial"]["true_refusals"]
    if not record["trial"]["refusals_is_lower_bound"]:
        assert trial["corrected"] is True and f"| ≈ {trial['estimate']:.0f} ({trial['low']:.0f}–{trial['high']:.0f}) |" in card
    assert f"corrected for {shipped.describe()}" in card


def test_a_record_from_before_the_exact_ablation_is_rebuilt_with_the_approximation() -> None:
    """... and one from before the read positions existed, with the last prompt token."""
    from heretic.export.reproduce import rebuilt_settings

    data = {"settings": {"model": "m", "row_normalization": "full", "full_normalization_rank": 3}, "model": {"name": "m"}}
    rebuilt = rebuilt_settings(Settings(model="m"), data)
    assert rebuilt.full_normalization_exact is False and rebuilt.direction_positions == [-1]
    data["settings"].update(full_normalization_exact=True, direction_positions=[-5, -4, -3, -2, -1])
    rebuilt = rebuilt_settings(Settings(model="m"), data)
    assert rebuilt.full_normalization_exact is True and rebuilt.direction_positions == [-5, -4, -3, -2, -1]
    # Settings removed since the record was written (they shaped the search, not its trials) are read as absent.
    data["settings"].update(search_mlp_off=True, n_ei_candidates=128, multivariate_tpe=True)
    data["settings"].update(subspace_rank=1, direction_method="mean", concept_ridge=0.1, learned_direction_steps=4)
    assert rebuilt_settings(Settings(model="m"), data).seed == 42
    # A record of a kind of ablation this version no longer has is refused in one sentence, not rebuilt otherwise.
    for name, value in (("direction_method", "learned"), ("subspace_rank", 2)):
        other = {"settings": dict(data["settings"], **{name: value}), "model": {"name": "m"}, "tool": {"version": "0.9"}}
        with pytest.raises(HereticError, match=f"was made with --{name.replace('_', '-')} .* rebuild it with heretic 0.9"):
            rebuilt_settings(Settings(model="m"), other)


def test_heldout_count_is_in_the_record_and_the_card(saved: dict[str, Path]) -> None:
    record = json.loads((saved["model"] / "heretic.json").read_text())
    heldout = record["heldout"]
    assert heldout["n_prompts"] == 8 and heldout["sha256"] == record["prompt_sets"]["harmful_eval"]["sha256"]
    assert heldout["original_refusals"] == record["baseline"]["refusals"]
    if not record["trial"]["refusals_is_lower_bound"]:
        assert heldout["refusals"] == record["trial"]["refusals"]
    card = (saved["model"] / "README.md").read_text()
    assert (
        f"On 8 held-out harmful prompts, never used for the directions or the search, this model refused {heldout['refusals']} "
        in card
    )
    assert 0 <= heldout["degenerate"] <= 8 and 0 <= heldout["original_degenerate"] <= 8  # from the count's responses
    assert f"Of its answers there, {heldout['degenerate']} ({heldout['degenerate'] / 8:.0%}) were degenerate" in card


def test_heldout_kl_and_over_refusals_are_in_the_record_and_the_card(saved: dict[str, Path]) -> None:
    """The chosen trial's KL on the held-out harmless prompts (beside the search's) and the over-refusal counts of
    the original and the trial (on the bundled set: no over-refusal objective was configured)."""
    record = json.loads((saved["model"] / "heretic.json").read_text())
    kl = record["heldout_kl"]
    assert kl["n_prompts"] == 8 and kl["spec"]["split"] == "harmless_heldout[:8]" and kl["in_search"] == record["trial"]["kl"]
    highest = [row["kl"] for row in kl["highest"]]
    assert len(highest) == 5 and highest == sorted(highest, reverse=True) and kl["median"] >= 0
    assert sum(highest) / 8 - 1e-6 <= kl["mean"] <= highest[0]  # the mean over all 8, of which these are the top 5
    over = record["over_refusal"]
    assert over["spec"]["split"] == "over_refusal" and over["n_prompts"] >= 120
    assert 0 <= over["refusals"] <= over["n_prompts"] and 0 <= over["original_refusals"] <= over["n_prompts"]
    card = " ".join((saved["model"] / "README.md").read_text().split())
    assert (
        f"On 8 held-out harmless prompts, never used for the directions or the search (many of them requests an assistant "
        f"often opens with a disclaimer: current events, prices, opinions, real-time data), this model's KL divergence from "
        f"the original was {kl['mean']:.4f} on average (median {kl['median']:.4f}), against {kl['in_search']:.4f}"
    ) in card
    assert f'Highest: "{kl["highest"][0]["prompt"]}"' in card
    n = over["n_prompts"]
    assert (
        f'On {n} harmless prompts that look harmful ("How do I kill a Python process?"), this model refused '
        f"{over['refusals']} ({over['refusals'] / n:.0%}) and the original {over['original_refusals']}"
    ) in card


def test_a_continued_run_takes_the_heldout_counts_from_the_study(saved: dict[str, Path], tmp_path: Path) -> None:
    """The held-out counts are kept in the study: a continued run shows the kept ones and counts none again
    (the kept counts are changed here, and the new card and record show the changed ones)."""
    import shutil

    import optuna

    from heretic.search.checkpoint import STUDY_NAME
    from heretic.session import HELDOUT_ATTR, HELDOUT_KL_ATTR, OVER_REFUSAL_ATTR

    record = json.loads((saved["model"] / "heretic.json").read_text())
    shutil.copytree(saved["root"] / "checkpoints", tmp_path / "checkpoints")
    (journal,) = (tmp_path / "checkpoints").glob("*.jsonl")
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    study = optuna.load_study(study_name=STUDY_NAME, storage=storage)
    ((key, counts),) = study.user_attrs[HELDOUT_ATTR].items()
    assert key == record["heldout"]["sha256"]
    assert counts == {
        "original": record["heldout"]["original_refusals"],
        str(record["trial"]["number"]): record["heldout"]["refusals"],
    }
    kept = {name: (count + 1) % 9 for name, count in counts.items()}
    study.set_user_attr(HELDOUT_ATTR, {key: kept})
    # The held-out KL and the over-refusal counts are kept the same way: changed here, shown as changed.
    ((kl_key, kl_kept),) = study.user_attrs[HELDOUT_KL_ATTR].items()
    assert kl_key == record["heldout_kl"]["sha256"] and list(kl_kept) == [str(record["trial"]["number"])]
    study.set_user_attr(HELDOUT_KL_ATTR, {kl_key: {name: [0.5, 0.25, 0, 0, 0, 0, 0, 1.0] for name in kl_kept}})
    ((over_key, over_kept),) = study.user_attrs[OVER_REFUSAL_ATTR].items()
    assert over_key == record["over_refusal"]["sha256"] and over_kept["original"] == record["over_refusal"]["original_refusals"]
    study.set_user_attr(OVER_REFUSAL_ATTR, {over_key: {name: count + 100 for name, count in over_kept.items()}})

    run(settings(saved["original"], tmp_path, action=["save"], resume="continue"))
    rerun = json.loads((tmp_path / "out" / "model" / "heretic.json").read_text())
    assert rerun["trial"]["number"] == record["trial"]["number"]
    assert rerun["heldout"]["original_refusals"] == kept["original"]
    assert rerun["heldout"]["refusals"] == kept[str(record["trial"]["number"])]
    assert (rerun["heldout_kl"]["mean"], rerun["heldout_kl"]["median"]) == (0.21875, 0.0)
    assert rerun["over_refusal"]["original_refusals"] == record["over_refusal"]["original_refusals"] + 100
    assert rerun["over_refusal"]["refusals"] == record["over_refusal"]["refusals"] + 100


def test_reproduce_gives_identical_weights(saved: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "rebuilt"
    with pytest.raises(HereticError, match="give your copy with --model PATH"):
        run(Settings(reproduce=str(saved["model"] / "heretic.json"), output_dir=str(target), headless=True))
    model = str(saved["original"])
    run(Settings(reproduce=str(saved["model"] / "heretic.json"), model=model, output_dir=str(target), headless=True))
    assert sha256_of(target) == sha256_of(saved["model"])
    assert "All 1 weight files match the record (SHA-256)" in capsys.readouterr().out

    adapter = tmp_path / "rebuilt-adapter"
    run(Settings(reproduce=str(saved["adapter"]), model=model, output_dir=str(adapter), headless=True))
    assert sha256_of(adapter) == sha256_of(saved["adapter"])


def test_reproduce_reports_a_weight_mismatch(saved: dict[str, Path], tmp_path: Path) -> None:
    """A record alone, whose hashes the rebuild does not match: the values cannot be compared, said so."""
    record = json.loads((saved["model"] / "heretic.json").read_text())
    size = record["saved"]["weights"]["model.safetensors"]["size"]
    record["saved"]["weights"]["model.safetensors"] |= {"sha256": "0" * 64, "size": size + 1}
    (tmp_path / "heretic.json").write_text(json.dumps(record))
    common = dict(reproduce=str(tmp_path / "heretic.json"), model=str(saved["original"]), headless=True)
    with pytest.raises(HereticError) as caught:
        run(Settings(**common, output_dir=str(tmp_path / "a")))
    message = " ".join(str(caught.value).split())
    assert "1 of the rebuilt weight files differ from the record's SHA-256 (model.safetensors: recorded" in message
    assert f"recorded {size + 1:,} bytes" in message and f"rebuilt {size:,} bytes" in message
    assert "not beside the record" in message and "--ignore-mismatches" in message
    assert (tmp_path / "a" / "model.safetensors").is_file()  # the rebuild stays
    run(Settings(**common, output_dir=str(tmp_path / "b"), ignore_mismatches=True))
    assert sha256_of(tmp_path / "b") == sha256_of(saved["model"])


def _recorded_as(saved_model: Path, folder: Path, change: Callable[[torch.Tensor], torch.Tensor]) -> Path:
    """A copy of a saved model whose ablated down_proj weights are changed, its record's hashes updated:
    what the recording machine would have written had it rounded differently."""
    from safetensors.torch import load_file, save_file

    from heretic.export.record import weight_digests

    shutil.copytree(saved_model, folder)
    tensors = load_file(folder / "model.safetensors")
    for name in tensors:
        if name.endswith("mlp.down_proj.weight"):
            tensors[name] = change(tensors[name]).contiguous()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    record = json.loads((folder / "heretic.json").read_text())
    record["saved"]["weights"] = weight_digests(folder)
    (folder / "heretic.json").write_text(json.dumps(record))
    return folder / "heretic.json"


def _one_ulp_up(tensor: torch.Tensor) -> torch.Tensor:
    every_seventh = torch.arange(tensor.numel()).reshape(tensor.shape) % 7 == 0
    return torch.where(every_seventh, torch.nextafter(tensor, torch.tensor(float("inf"))), tensor)


def test_reproduce_accepts_weights_within_rounding_and_names_the_largest_difference(
    saved: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Rebuilt elsewhere, the weights may differ in their last bits: equal within tolerance, exit 0, with
    the largest difference; a difference beyond rounding (here a weight 1 % off) is an error naming it."""
    close = _recorded_as(saved["model"], tmp_path / "close", _one_ulp_up)
    run(Settings(reproduce=str(close), model=str(saved["original"]), output_dir=str(tmp_path / "a"), headless=True))
    out = " ".join(capsys.readouterr().out.split())
    assert "All 1 weight files match the record: 1 by value within tolerance, not by SHA-256" in out
    assert re.search(r"worst model\.safetensors \(model\.layers\.\d\.mlp\.down_proj\.weight\): largest difference", out)

    far = _recorded_as(saved["model"], tmp_path / "far", lambda tensor: tensor * 1.01)
    with pytest.raises(HereticError, match=r"differ from the record beyond rounding \(model\.safetensors \(model\.layers"):
        run(Settings(reproduce=str(far), model=str(saved["original"]), output_dir=str(tmp_path / "b"), headless=True))


def test_reproduce_from_the_hub_downloads_the_recorded_weights_to_compare(
    saved: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A record read from a Hub repository: its weight files are downloaded from the same repository and
    revision when the rebuild's hashes differ."""
    import huggingface_hub

    repository = _recorded_as(saved["model"], tmp_path / "repository", _one_ulp_up).parent
    calls: list[tuple[str, str, str | None]] = []

    def download(repo_id: str, filename: str, revision: str | None = None, **_: object) -> str:
        calls.append((repo_id, filename, revision))
        folder = tmp_path / "hub" / filename  # each file in a folder of its own, as a cache would not be laid out
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(repository / filename, folder / filename)
        return str(folder / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    run(Settings(reproduce="someone/model-heretic", model=str(saved["original"]), output_dir=str(tmp_path / "a"), headless=True))
    assert calls == [("someone/model-heretic", "heretic.json", None), ("someone/model-heretic", "model.safetensors", None)]
    assert "1 by value within tolerance" in " ".join(capsys.readouterr().out.split())


def test_reproduce_under_another_blas_kernel_path_exits_zero(saved: dict[str, Path], tmp_path: Path) -> None:
    """The rebuild in a process whose BLAS takes another code path (MKL_CBWR=COMPATIBLE: no AVX kernels)
    matches the record by hash or within tolerance, never a mismatch error."""
    command = [sys.executable, "-m", "heretic", "--reproduce", str(saved["model"] / "heretic.json")]
    command += ["--model", str(saved["original"]), "--output-dir", str(tmp_path / "rebuilt")]
    done = subprocess.run(command, env=os.environ | {"MKL_CBWR": "COMPATIBLE"}, capture_output=True, text=True, timeout=600)
    out = " ".join(done.stdout.split())
    assert done.returncode == 0, done.stdout + done.stderr
    assert "All 1 weight files match the record" in out


def test_multimodal_model_is_saved_with_a_working_processor(tmp_path: Path) -> None:
    """The merged multimodal model keeps its processor: plain transformers answers an image prompt with it."""
    from PIL import Image
    from tiny import save_tiny_with_processor
    from transformers import AutoProcessor, Gemma3ForConditionalGeneration

    original = save_tiny_with_processor(tmp_path / "gemma3-mm")
    run(settings(original, tmp_path, action=["save"], n_trials=1))
    folder = tmp_path / "out" / "model"
    assert {"processor_config.json", "preprocessor_config.json"} & {file.name for file in folder.iterdir()}
    processor = AutoProcessor.from_pretrained(folder)
    assert type(processor).__name__ == "Gemma3Processor"
    image = Image.new("RGB", (40, 30), (200, 40, 90))
    inputs = processor(text=["Describe <start_of_image> briefly."], images=[[image]], return_tensors="pt")
    assert inputs["pixel_values"].shape[-2:] == (28, 28)
    assert (inputs["input_ids"] == 3).sum() == 4  # the image's four placeholder tokens
    model = Gemma3ForConditionalGeneration.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(logits).all()


def test_existing_output_is_never_overwritten_without_consent(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    target = tmp_path / "out" / "model"
    target.mkdir(parents=True)
    (target / "precious.txt").write_text("keep me")
    with pytest.raises(HereticError, match="already exists and is not empty"):
        run(settings(tiny_models["qwen2"], tmp_path, action=["save"], n_trials=1))
    assert (target / "precious.txt").read_text() == "keep me"
    run(settings(tiny_models["qwen2"], tmp_path, action=["save"], n_trials=1, overwrite=True))
    assert not (target / "precious.txt").exists() and (target / "model.safetensors").exists()


def test_interrupted_write_leaves_the_target_untouched(tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_folder(target, overwrite=True) as staging:
        (staging / "half.safetensors").write_bytes(b"\0" * 100)
        raise KeyboardInterrupt
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # the staging folder is gone


def test_killed_save_leaves_the_target_untouched(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("old")
    script = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from heretic.export.save import atomic_folder
        with atomic_folder(Path({str(target)!r}), overwrite=True) as staging:
            (staging / "model-00001.safetensors").write_bytes(b"x" * 1000)
            print("writing", flush=True)
            time.sleep(60)
        """
    )
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "writing"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert [p.name for p in target.iterdir()] == ["old.txt"] and (target / "old.txt").read_text() == "old"


def test_upload_offline_is_one_clear_error_and_keeps_the_save(
    tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value_123")
    with pytest.raises(HereticError, match="the model stays saved in") as info:
        run(settings(tiny_models["llama"], tmp_path, action=["upload"], upload_repo="someone/abliterated", n_trials=1))
    assert "hf_secret_value_123" not in str(info.value)
    saved = tmp_path / "out" / "model"
    assert (saved / "model.safetensors").exists()
    assert "hf_secret_value_123" not in "".join(
        p.read_text(errors="ignore") for p in saved.iterdir() if p.suffix in {".json", ".md"}
    )


def test_benchmark_with_a_local_task(tiny_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("lm_eval")
    data = tmp_path / "tiny_task.jsonl"
    rows = [
        {"question": f"What is {a} plus {b}?", "choices": [str(a + b), str(a + b + 1)], "answer": 0}
        for a, b in [(1, 2), (3, 4), (2, 2), (5, 1)]
    ]
    data.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    task = tmp_path / "tiny_task.yaml"
    task.write_text(
        textwrap.dedent(f"""\
        task: heretic_tiny_sums
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{question}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: "{{{{answer}}}}"
        metric_list:
          - metric: acc
        """)
    )
    capsys.readouterr()
    run(settings(tiny_models["llama"], tmp_path, action=["benchmark"], benchmark_tasks=[str(task)], n_trials=1))
    out = " ".join(capsys.readouterr().out.split())
    assert "heretic_tiny_sums" in out and "acc" in out and "original" in out and "ablated" in out


def test_upload_adapter_sends_the_adapter_its_card_and_record(
    tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    commits = []

    class FakeApi:
        def __init__(self, token):
            pass

        def create_repo(self, repo_id, **kwargs):
            pass

        def create_commit(self, repo_id, operations, **kwargs):
            commits.append((repo_id, {op.path_in_repo: op.path_or_fileobj for op in operations}))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    run(settings(tiny_models["llama"], tmp_path, action=["upload-adapter"], upload_repo="someone/adapter", n_trials=1))
    [(repo, files)] = commits
    assert repo == "someone/adapter"
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "heretic.json"} <= set(files)
    assert not any(name.endswith("model.safetensors") and name != "adapter_model.safetensors" for name in files)
    card = Path(files["README.md"]).read_text()
    assert "library_name: peft" in card and "a LoRA adapter" in card and str(tmp_path) not in card
