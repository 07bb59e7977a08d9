"""Merged saves: tensor by tensor from the checkpoint files, in memory, and after quantized loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import make_tokenizer
from transformers import AutoModelForCausalLM

from heretic.ablation.adapters import Ablator
from heretic.ablation.parameters import AblationParameters, ComponentKernel
from heretic.errors import HereticError
from heretic.export import save as save_module
from heretic.export.save import save_merged
from heretic.export.shards import header_bytes, read_entries, read_tensor
from heretic.model.architecture import build_architecture_map
from heretic.model.loading import load_model

IDS = torch.tensor([[5, 17, 42, 99, 7, 200, 13]])


def _parameters() -> AblationParameters:
    attn = ComponentKernel(max_weight=1.2, max_weight_position=1.5, min_weight=0.4, min_weight_distance=2.0)
    mlp = ComponentKernel(max_weight=0.9, max_weight_position=2.0, min_weight=0.3, min_weight_distance=1.0)
    return AblationParameters("global", 1.3, {"attn": attn, "mlp": mlp})


def _directions() -> torch.Tensor:
    torch.manual_seed(3)
    return torch.nn.functional.normalize(torch.randn(5, 64), dim=-1)


def _session(folder: Path, quantization: str = "none", mode: str = "none", dtype: str = "float32"):
    loaded = load_model(str(folder), dtypes=[dtype], quantization=quantization, cache_dir="cache")
    ablator = Ablator(loaded.model, build_architecture_map(loaded.model), mode, 3, 0)
    return loaded, ablator


def _save(loaded, ablator, target: Path, **options) -> Path:
    return save_merged(loaded, ablator, _parameters(), _directions(), target, **options)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def _assert_identical(first: Path, second: Path) -> None:
    a, b = _tensors(first), _tensors(second)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    config_a, config_b = (json.loads((folder / "config.json").read_text()) for folder in (first, second))
    assert config_a == config_b


def test_the_streaming_writer_round_trips_through_safetensors(tmp_path: Path) -> None:
    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.randn(2, 2).to(torch.bfloat16),
        "c": torch.arange(7, dtype=torch.int64),
        "d": torch.tensor(1.5),
        "e": torch.zeros(0, 4),
    }
    file = tmp_path / "x.safetensors"
    with open(file, "wb") as out:
        out.write(header_bytes([(name, tensor.dtype, tuple(tensor.shape)) for name, tensor in tensors.items()]))
        for tensor in tensors.values():
            out.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))
    loaded = load_file(file)
    assert sorted(loaded) == sorted(tensors)
    with open(file, "rb") as handle:
        for entry in read_entries(file):
            assert torch.equal(read_tensor(handle, entry), tensors[entry.name]) and torch.equal(
                loaded[entry.name], tensors[entry.name]
            )


@pytest.mark.parametrize(
    ("kind", "dtype", "mode", "shard"),
    [
        ("llama", "original", "none", "5GB"),
        ("qwen2", "bfloat16", "pre", "40KB"),  # several shards
        ("gemma3", "original", "full", "100KB"),
        ("gemma3_mm", "original", "none", "5GB"),
    ],
)
def test_streamed_save_equals_the_in_memory_save_bit_for_bit(
    kind: str, dtype: str, mode: str, shard: str, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    loaded, ablator = _session(tiny_models[kind], mode=mode)
    streamed = _save(loaded, ablator, tmp_path / "streamed", dtype=dtype, max_shard_size=shard, method="streamed")
    in_memory = _save(loaded, ablator, tmp_path / "memory", dtype=dtype, max_shard_size=shard, method="in-memory")
    _assert_identical(streamed, in_memory)
    if shard != "5GB":
        index = json.loads((streamed / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
        assert sorted(index["weight_map"]) == sorted(_tensors(streamed))


def test_streamed_save_from_a_bfloat16_checkpoint_computed_in_float32(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """The file's bfloat16 tensors are cast to the compute dtype as loading does; the result is
    written back in bfloat16 (the model's own) and equals the in-memory save."""
    folder = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.bfloat16).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    loaded, ablator = _session(folder)
    assert loaded.dtype == torch.float32 and loaded.native_dtype == torch.bfloat16
    streamed = _save(loaded, ablator, tmp_path / "streamed", method="streamed")
    _assert_identical(streamed, _save(loaded, ablator, tmp_path / "memory", method="in-memory"))
    assert all(tensor.dtype == torch.bfloat16 for tensor in _tensors(streamed).values())


def test_streamed_save_gives_the_adapters_logits(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    loaded, ablator = _session(tiny_models["qwen2"])
    folder = _save(loaded, ablator, tmp_path / "out")  # auto: streamed
    assert not (folder / "adapter_config.json").exists()
    ablator.apply(_parameters(), _directions())
    with torch.no_grad():
        expected = loaded.model(IDS).logits
        merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(IDS).logits
    torch.testing.assert_close(merged, expected, atol=1e-4, rtol=1e-4)


def test_fused_experts_fall_back_to_the_in_memory_save(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """transformers stores MoE experts one by one in the checkpoint and fuses them on load: the
    checkpoint's tensors are not the model's, so the save is made in memory (auto), or refused when
    streaming is asked for."""
    loaded, ablator = _session(tiny_models["qwen3_moe"])
    folder = _save(loaded, ablator, tmp_path / "auto")
    _assert_identical(folder, _save(loaded, ablator, tmp_path / "memory", method="in-memory"))
    with pytest.raises(HereticError, match="cannot be written tensor by tensor"):
        _save(loaded, ablator, tmp_path / "streamed", method="streamed")


# --- Quantized loading -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def quantizable(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama whose matrices bitsandbytes' CPU kernels take (input sizes multiples of 64)."""
    import transformers as tf

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        from test_faults import in_ci

        message = "bitsandbytes is not installed (make setup installs it with the dev extra)"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    folder = tmp_path_factory.mktemp("quantizable")
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, eos_token_id=2, pad_token_id=0, bos_token_id=0, tie_word_embeddings=False,
    )  # fmt: skip
    tf.LlamaForCausalLM(config).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("quantization", ["bnb-4bit", "bnb-8bit"])
def test_a_quantized_model_is_merged_in_full_precision(quantization: str, quantizable: Path, tmp_path: Path) -> None:
    """The merged model of a quantized search is the full-precision model's: the ablated weights are
    read again from the checkpoint (or the original reloaded on the CPU), never the quantized ones."""
    folder = quantizable
    full, full_ablator = _session(folder)
    expected = _save(full, full_ablator, tmp_path / "full", method="in-memory")
    loaded, ablator = _session(folder, quantization=quantization)
    assert loaded.quantization == quantization and loaded.model.config.to_dict().get("quantization_config")
    streamed = _save(loaded, ablator, tmp_path / "streamed")
    _assert_identical(streamed, expected)
    reloaded = _save(loaded, ablator, tmp_path / "reloaded", method="reload")
    _assert_identical(reloaded, expected)
    assert "quantization_config" not in json.loads((streamed / "config.json").read_text())


@pytest.mark.parametrize("quantization", ["bnb-4bit", "bnb-8bit"])
def test_the_search_ablates_the_dequantized_weights(quantization: str, quantizable: Path) -> None:
    """During the search the factors come from the quantized weights as bitsandbytes dequantizes
    them: with weight 1 the adapters remove the direction from exactly those matrices."""
    from heretic.model.architecture import as_matrices

    loaded, ablator = _session(quantizable, quantization=quantization)
    one = ComponentKernel(max_weight=1.0, max_weight_position=1.5, min_weight=1.0, min_weight_distance=10.0)
    parameters = AblationParameters("per-layer", 0.0, {"attn": one, "mlp": one})
    directions = _directions()
    count = 0
    for target, factors in ablator.factors(parameters, directions):
        layer = int(target.module.split(".")[2])
        module = loaded.model.get_submodule(target.module)
        dense = as_matrices(getattr(module, target.parameter), target, module)
        v = directions[layer + 1]
        assert torch.einsum("o,eoi->ei", v, dense).abs().max() > 1e-2  # quantized weights, dequantized
        assert torch.einsum("o,eoi->ei", v, factors.merged(dense)).abs().max() < 1e-4
        count += 1
    assert count == 8


def test_an_8bit_weight_is_dequantized_after_the_model_has_run(quantizable: Path) -> None:
    """bitsandbytes moves an 8-bit weight's row scales from the weight (weight.SCB) to its module
    (module.state.SCB) at the first forward pass: the factors must still be built on W = Q s / 127,
    never on the raw int8 codes."""
    full, full_ablator = _session(quantizable)
    loaded, ablator = _session(quantizable, quantization="bnb-8bit")
    with torch.no_grad():
        loaded.model(IDS)  # a real forward pass
    module = loaded.model.get_submodule("model.layers.0.mlp.down_proj.base_layer")
    assert getattr(module.weight, "SCB", None) is None and module.state.SCB is not None
    for _, _, target in ablator.arch.targets():
        dense, expected = ablator._dense(target), full_ablator._dense(target)
        assert (dense - expected).abs().max() < 0.02 * expected.abs().max(), target.name  # int8 rounding only


def test_a_reload_that_does_not_fit_is_refused_in_one_sentence(
    quantizable: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded, ablator = _session(quantizable, quantization="bnb-4bit")
    monkeypatch.setattr(save_module, "available_memory", lambda: 1000)
    with pytest.raises(HereticError, match=r"needs the original in float32 on the CPU, about 0\.0 GiB, but only 0\.0 GiB"):
        _save(loaded, ablator, tmp_path / "out", method="reload")
    assert not (tmp_path / "out").exists()


def test_tied_embeddings_are_written_once_by_both_saves(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """A model with tied embeddings computed in float32 and saved in bfloat16: the cast keeps the
    tie, so neither save writes lm_head.weight (the checkpoint has only the embedding)."""
    import transformers as tf

    folder = tmp_path / "tied"
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    tf.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    loaded, ablator = _session(folder)
    streamed = _save(loaded, ablator, tmp_path / "streamed", method="streamed")
    in_memory = _save(loaded, ablator, tmp_path / "memory", method="in-memory")
    _assert_identical(streamed, in_memory)
    assert "lm_head.weight" not in _tensors(streamed)


@pytest.mark.slow
def test_the_save_memory_benchmark_runs_on_a_tiny_model(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    output = tmp_path / "save_memory.json"
    command = [sys.executable, "-m", "bench.save_memory", "--model", str(tiny_models["llama"]), "--output", str(output)]
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy(), timeout=300, check=False, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(output.read_text())
    runs = {run["method"]: run for run in record["runs"]}
    assert sorted(runs) == ["in-memory", "streamed"]
    for run in runs.values():
        assert run["peak_during_save_bytes"] >= run["rss_before_bytes"] > 0 and run["weights_bytes"] > 0
    assert runs["in-memory"]["weights_bytes"] == runs["streamed"]["weights_bytes"]
    assert "save needs" in done.stdout and "streamed" in done.stdout


def test_quantized_weights_count_in_the_fingerprint_and_unquantized_ones_keep_it() -> None:
    from test_study import PROMPT_SETS, fake_loaded

    from heretic.config import Settings, fingerprint_entry
    from heretic.search.study import study_fingerprint

    plain = fake_loaded()
    quantized = fake_loaded()
    quantized.quantization = "bnb-4bit"
    assert fingerprint_entry("quantization") == "dtype"
    first = study_fingerprint(Settings(), plain, PROMPT_SETS, "")
    second = study_fingerprint(Settings(quantization="bnb-4bit"), quantized, PROMPT_SETS, "")
    assert first["dtype"] == "torch.bfloat16" and second["dtype"] == "torch.bfloat16 bnb-4bit"


def test_the_gguf_exporter_gets_the_full_precision_merge_of_a_quantized_model(quantizable: Path) -> None:
    """merged_model (what the GGUF export reads) of a quantized search is the full-precision merge."""
    from types import SimpleNamespace

    from heretic.export.merged import merged_model

    full, full_ablator = _session(quantizable)
    expected = full_ablator.merged_state_dict(_parameters(), _directions())
    loaded, ablator = _session(quantizable, quantization="bnb-8bit")
    session = SimpleNamespace(loaded=loaded, ablator=ablator, directions=_directions())
    with merged_model(session, _parameters()) as (model, changed):  # type: ignore[arg-type]
        state = model.state_dict()
        assert changed and all(torch.equal(state[name], expected[name]) for name in changed)
        assert all(state[name].dtype == torch.float32 for name in changed)


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["bnb-4bit", "bnb-8bit"])
def test_a_quantized_search_saves_the_full_precision_merged_model(
    quantization: str, quantizable: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """heretic MODEL --quantization … --action save, end to end on the CPU: the saved folder is a
    plain full-precision model whose reproduction record names the quantization."""
    from test_faults import RUN_FLAGS, run_cli
    from tiny import PROMPT_FLAGS

    flags = [flag if flag not in ("report", "examples") else "save" for flag in RUN_FLAGS]
    argv = [str(quantizable), *PROMPT_FLAGS, *flags, "--quantization", quantization, "--output-dir", str(tmp_path / "out")]
    code, text = run_cli(argv, capsys)
    assert code == 0, text
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    tensors = _tensors(tmp_path / "out")
    assert all(tensor.dtype == torch.float32 for tensor in tensors.values())
    record = json.loads((tmp_path / "out" / "heretic.json").read_text())
    assert quantization in json.dumps(record)
