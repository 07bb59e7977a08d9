"""The fault catalogue: broken inputs and faults a new user meets, each ending in one sentence.

Every case asserts its exit code, a sentence that says what is wrong and how to fix it, no
traceback, and that nothing was lost: what existed before (an output folder, a checkpoint) is
byte-identical afterwards and no partial file remains.

Fast cases run in-process in the default suite. The slow ones (a search, a subprocess, a kill, a
signal) are marked `faults_slow` and run with `make test-faults`.

Simulated faults (as root, permission bits stop nothing):
- a full disk: a small tmpfs mounted for the test, filled so that only a few KiB stay free; the
  write then fails with ENOSPC exactly as on a full disk;
- a read-only place: a tmpfs (or a bind mount of a test folder) remounted read-only: EROFS.
Where mounting is not permitted the case is skipped, except under CI=true, where it fails.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tiny import PROMPT_FLAGS, SCORING_FLAGS

from heretic.cli import main

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_FAKEfaultCatalogueToken0123456789"

RUN_FLAGS = [
    *SCORING_FLAGS,
    "--n-trials",
    "1",
    "--n-startup-trials",
    "1",
    "--dtypes",
    "float32",
    "--headless",
    "--checkpoint-dir",
    "checkpoints",
    "--action",
    "examples",
]


# --- Helpers -----------------------------------------------------------------------------------


def snapshot(root: Path, skip: tuple[str, ...] = ("cache",)) -> dict[str, str]:
    """Path -> sha256 of every file under root (folders as 'dir'), leaving out `skip` at the top."""
    files: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if relative.parts[0] in skip:
            continue
        files[str(relative)] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def partial_files(root: Path) -> list[str]:
    return [str(path) for path in root.rglob("*") if re.search(r"\.(partial|repair|previous)-", path.name)]


def one_sentence(text: str) -> str:
    return " ".join(text.split())


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """(exit code, everything printed) of `heretic ARGV` in this process. An exception other than
    SystemExit escapes, and fails the test, as the traceback it would print."""
    capsys.readouterr()
    code = 0
    try:
        main(argv)
    except SystemExit as exit_info:
        code = exit_info.code if isinstance(exit_info.code, int) else 1
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "Traceback" not in text, text
    return code, text


def error_line(text: str) -> str:
    """The one error sentence, joined from the lines it was wrapped over."""
    flat = one_sentence(text)
    assert "Error:" in flat, flat[-2000:]
    return flat[flat.index("Error:") + len("Error:") :].strip()


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def missing_facility(what: str) -> None:
    if in_ci():
        pytest.fail(f"{what} is needed for this case and is not available on this machine")
    pytest.skip(f"{what} is not available here")


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "4m") -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)], capture_output=True)
    if result.returncode != 0:
        missing_facility("mounting a tmpfs (to simulate a full disk or a read-only place)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def make_read_only(path: Path) -> None:
    """Remount a mount point read-only (writes fail with EROFS)."""
    result = subprocess.run(["mount", "-o", "remount,ro", str(path)], capture_output=True)
    if result.returncode != 0:
        missing_facility("remounting a tmpfs read-only")


@contextlib.contextmanager
def read_only_bind(path: Path) -> Iterator[Path]:
    """`path` (an existing folder) made read-only in place by a read-only bind mount of itself."""
    result = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True)
    if result.returncode != 0:
        missing_facility("a bind mount (to make a folder read-only)")
    try:
        result = subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], capture_output=True)
        if result.returncode != 0:
            missing_facility("remounting a bind mount read-only")
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(mount: Path, leave: int) -> None:
    """Fill the tmpfs at `mount` until only about `leave` bytes stay free."""
    stat = os.statvfs(mount)
    free = stat.f_bavail * stat.f_frsize
    size = max(0, free - leave)
    with open(mount / ".filler", "wb") as handle:
        chunk = b"\0" * (1 << 20)
        while size > 0:
            size -= handle.write(chunk[: min(len(chunk), size)])


# --- Fixtures ----------------------------------------------------------------------------------


@pytest.fixture
def model(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["llama"]


@pytest.fixture
def precious(tmp_path: Path) -> Path:
    """Things a failed run must leave byte-identical: a checkpoint of another search and an output folder."""
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "other-search-0123456789ab.jsonl").write_text('{"op_code": 0, "study_name": "x"}\n')
    (tmp_path / "earlier-output").mkdir()
    (tmp_path / "earlier-output" / "model.safetensors").write_bytes(b"weights")
    return tmp_path


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def tiny_gguf(path: Path) -> Path:
    """A small valid GGUF file (one tensor) written with the gguf library."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# --- Fast cases: settings ----------------------------------------------------------------------

# (id, argv after the model, regex of the sentence). All exit 2 and fail before the model loads.
SETTINGS_CASES = [
    ("n_trials word", ["--n-trials", "many"], r"Invalid setting 'n_trials'.*--n-trials"),
    ("n_trials negative", ["--n-trials", "-1"], r"Invalid setting 'n_trials'.*greater than or equal"),
    ("n_trials fraction", ["--n-trials", "1.5"], r"Invalid setting 'n_trials'"),
    ("n_startup_trials negative", ["--n-startup-trials", "-1"], r"Invalid setting 'n_startup_trials'.*greater than or equal"),
    ("max_response_length zero", ["--max-response-length", "0"], r"Invalid setting 'max_response_length'.*greater than"),
    ("batch_size negative", ["--batch-size", "-1"], r"Invalid setting 'batch_size'"),
    ("max_batch_size zero", ["--max-batch-size", "0"], r"Invalid setting 'max_batch_size'"),
    ("winsorization_quantile above one", ["--winsorization-quantile", "2"], r"Invalid setting 'winsorization_quantile'"),
    ("full_normalization_rank zero", ["--full-normalization-rank", "0"], r"Invalid setting 'full_normalization_rank'"),
    ("max_kl zero", ["--max-kl", "0"], r"Invalid setting 'max_kl'.*greater than"),
    ("max_refusals negative", ["--max-refusals", "-1"], r"Invalid setting 'max_refusals'"),
    ("sampler_kl_floor word", ["--sampler-kl-floor", "low"], r"Invalid setting 'sampler_kl_floor'"),
    ("seed word", ["--seed", "lucky"], r"Invalid setting 'seed'"),
    ("benchmark_limit zero", ["--benchmark-limit", "0"], r"Invalid setting 'benchmark_limit'"),
    (
        "row_normalization choice",
        ["--row-normalization", "sideways"],
        r"Invalid setting 'row_normalization'.*'none', 'pre' or 'full'",
    ),
    ("resume choice", ["--resume", "maybe"], r"Invalid setting 'resume'"),
    ("select choice", ["--select", "best"], r"Invalid setting 'select'"),
    ("gguf_type choice", ["--gguf-type", "q4_k"], r"Invalid setting 'gguf_type'.*'f16', 'bf16' or 'q8_0'"),
    ("quantization choice", ["--quantization", "8bit"], r"Invalid setting 'quantization'"),
    ("log_level choice", ["--log-level", "LOUD"], r"Invalid setting 'log_level'"),
    ("action choice", ["--action", "fly"], r"Invalid setting 'action'"),
    ("dtypes unknown", ["--dtypes", "float128"], r"Invalid setting 'dtypes'.*unknown dtype 'float128'"),
    ("device_map bad json", ["--device-map", "{cuda"], r"Invalid setting 'device_map'.*is not valid JSON"),
    (
        "device_map meta",
        ["--device-map", '{"model.layers": "meta", "lm_head": "cpu"}'],
        r"Invalid setting 'device_map'.*'meta' \(for 'model\.layers'\) is not a device modules can be placed on; use",
    ),
    ("device_map unknown", ["--device-map", "gpu"], r"Invalid setting 'device_map'.*'gpu' is neither a strategy"),
    ("max_memory not an object", ["--max-memory", "[1, 2]"], r"Invalid setting 'max_memory'"),
    ("refusal_markers broken json", ["--refusal-markers", "[broken"], r"Invalid setting 'refusal_markers'.*JSON"),
    ("thinking_tags wrong shape", ["--thinking-tags", '["<think>"]'], r"Invalid setting 'thinking_tags'"),
    ("prompt set shorthand", ["--harmful-prompts", ""], r"Invalid setting 'harmful_prompts'.*SOURCE\[:SPLIT\]\[SLICE\]"),
    ("trial word", ["--trial", "best"], r"Invalid setting 'trial'"),
    (
        "max_shard_size without unit",
        ["--max-shard-size", "huge"],
        r"Invalid setting 'max_shard_size'.*'huge' is not a size; write a number and one of the units TB, GB, MB, KB",
    ),
]


@pytest.mark.parametrize(("argv", "pattern"), [case[1:] for case in SETTINGS_CASES], ids=[case[0] for case in SETTINGS_CASES])
def test_settings(argv: list[str], pattern: str, precious: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = snapshot(precious)
    code, text = run_cli(["./no-model-needed", *argv], capsys)
    assert code == 2, text
    assert re.search(pattern, error_line(text)), error_line(text)
    assert snapshot(precious) == before and not partial_files(precious)


# (id, setup(tmp_path) -> argv, regex). Config files and paths of the wrong kind; all exit 2.
CONFIG_CASES: list[tuple[str, Callable[[Path], list[str]], str]] = [
    (
        "config is a folder",
        lambda t: ["--config", str((t / "conf.d").mkdir() or t / "conf.d")],
        r"config file .*conf\.d is a folder",
    ),
    ("config missing", lambda t: ["--config", "nowhere.toml"], r"nowhere\.toml does not exist"),
    ("config not toml", lambda t: ["--config", str(write(t / "c.toml", "n_trials = = 3\n"))], r"not valid TOML"),
    (
        "config not utf8",
        lambda t: ["--config", str(write(t / "c.toml", "system_prompt = '\xe9'\n".encode("latin-1")))],
        r"c\.toml is not UTF-8 text",
    ),
    ("config unknown key", lambda t: ["--config", str(write(t / "c.toml", "n_trails = 3\n"))], r"Unknown setting 'n_trails'"),
    (
        "config retired key",
        lambda t: ["--config", str(write(t / "c.toml", "search_mlp_off = true\n"))],
        r"The setting 'search_mlp_off' was removed, every search now has false",
    ),
    (
        "config retired direction key",
        lambda t: ["--config", str(write(t / "c.toml", "concept_ridge = 0.5\n"))],
        r"The setting 'concept_ridge' was removed \(delete it from .*c\.toml\)",
    ),
    (
        "config wrong type",
        lambda t: ["--config", str(write(t / "c.toml", "n_trials = 'ten'\n"))],
        r"Invalid setting 'n_trials'.*c\.toml",
    ),
    (
        "config list for a number",
        lambda t: ["--config", str(write(t / "c.toml", "batch_size = [1, 2]\n"))],
        r"Invalid setting 'batch_size'",
    ),
]


@pytest.mark.parametrize(("setup", "pattern"), [case[1:] for case in CONFIG_CASES], ids=[case[0] for case in CONFIG_CASES])
def test_config_files(
    setup: Callable[[Path], list[str]], pattern: str, precious: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = setup(precious)
    before = snapshot(precious)
    code, text = run_cli(["./no-model-needed", *argv], capsys)
    assert code == 2, text
    assert re.search(pattern, error_line(text)), error_line(text)
    assert snapshot(precious) == before


def test_unknown_environment_variable(
    precious: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HERETIC_N_TRAILS", "3")
    code, text = run_cli(["./no-model-needed"], capsys)
    assert code == 2 and re.search(r"n_trails.*HERETIC_N_TRAILS", error_line(text)), text


# --- Fast cases: models ------------------------------------------------------------------------


def _truncated_weights(t: Path, model: Path) -> str:
    folder = t / "truncated"
    shutil.copytree(model, folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    return str(folder)


def _damaged_header(t: Path, model: Path) -> str:
    folder = t / "damaged-header"
    shutil.copytree(model, folder)
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[8:20] = b"#" * 12  # the JSON header no longer parses
    (folder / "model.safetensors").write_bytes(bytes(data))
    return str(folder)


def _no_weights(t: Path, model: Path) -> str:
    folder = t / "no-weights"
    shutil.copytree(model, folder)
    (folder / "model.safetensors").unlink()
    return str(folder)


def _garbage_config(t: Path, model: Path) -> str:
    folder = t / "bad-config"
    shutil.copytree(model, folder)
    (folder / "config.json").write_text("{ not json")
    return str(folder)


def _unknown_architecture(t: Path, model: Path) -> str:
    folder = t / "unknown-arch"
    shutil.copytree(model, folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "no_such_family", "architectures": ["NoSuchForCausalLM"]}))
    return str(folder)


def _remote_code(t: Path, model: Path) -> str:
    folder = t / "remote-code"
    shutil.copytree(model, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="custom_family",
        auto_map={"AutoConfig": "configuration_custom.CustomConfig", "AutoModelForCausalLM": "modeling_custom.CustomModel"},
    )
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def _truncated_gguf(t: Path, model: Path) -> str:
    data = tiny_gguf(t / "whole.gguf").read_bytes()
    return str(write(t / "models" / "cut.gguf", data[: len(data) // 2]))


def _text_as_gguf(t: Path, model: Path) -> str:
    return str(write(t / "notes.gguf", "This is a text file, not a model.\n"))


def _text_as_model(t: Path, model: Path) -> str:
    return str(write(t / "model.txt", "meta-llama/Llama-3.1-8B-Instruct\n"))


def _several_ggufs(t: Path, model: Path) -> str:
    tiny_gguf(write(t / "two" / "a.gguf", b"").parent / "a.gguf")
    tiny_gguf(t / "two" / "b.gguf")
    return str(t / "two")


def _empty_folder(t: Path, model: Path) -> str:
    (t / "empty").mkdir()
    return str(t / "empty")


# (id, setup(tmp_path, tiny model) -> model argument, regex); all exit 2.
MODEL_CASES: list[tuple[str, Callable[[Path, Path], str], str]] = [
    (
        "truncated safetensors",
        _truncated_weights,
        r"The weights file model\.safetensors in .*truncated is truncated \([\d,]+ of [\d,]+ bytes\); download or copy the model again",
    ),
    (
        "weights header damaged",
        _damaged_header,
        r"The weights file model\.safetensors in .*damaged-header is damaged \(.*\); download or copy the model again",
    ),
    ("weights missing", _no_weights, r"Cannot load the model in .*no-weights"),
    ("config not json", _garbage_config, r"Cannot load the model in .*bad-config"),
    ("unknown architecture", _unknown_architecture, r"Cannot load the model in .*unknown-arch"),
    ("remote code", _remote_code, r"needs code from its repository to run; if you trust it, pass --trust-remote-code"),
    (
        "truncated gguf",
        _truncated_gguf,
        r"cut\.gguf is not a complete GGUF file \(.*\); it may be truncated: download or copy it again",
    ),
    ("text file named gguf", _text_as_gguf, r"notes\.gguf is not a GGUF file"),
    ("text file as model", _text_as_model, r"model\.txt is a file but not a model"),
    ("several gguf files", _several_ggufs, r"holds several GGUF files \(a\.gguf, b\.gguf\); name the one to use"),
    ("empty folder", _empty_folder, r"holds no model \(no config\.json and no \.gguf file\)"),
    ("missing path", lambda t, m: "./nowhere/model", r"The model path ./nowhere/model does not exist"),
    ("missing gguf", lambda t, m: "nowhere.gguf", r"The GGUF file nowhere\.gguf does not exist"),
    ("not an id", lambda t, m: "a b c", r"Cannot load a b c from the Hugging Face Hub \(Repo id must use alphanumeric chars"),
    (
        "hub id offline",
        lambda t, m: "someone/not-cached-model",
        r"Cannot load someone/not-cached-model from the Hugging Face Hub",
    ),
]


@pytest.mark.parametrize(("setup", "pattern"), [case[1:] for case in MODEL_CASES], ids=[case[0] for case in MODEL_CASES])
def test_models(
    setup: Callable[[Path, Path], str], pattern: str, model: Path, precious: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argument = setup(precious, model)
    before = snapshot(precious)
    code, text = run_cli([argument, *PROMPT_FLAGS, *RUN_FLAGS], capsys)
    assert code == 2, text
    assert re.search(pattern, error_line(text)), error_line(text)
    assert snapshot(precious) == before and not partial_files(precious)


# Settings that are only checked once the model is loaded: (id, argv, regex); all exit 2.
LATE_SETTINGS_CASES = [
    (
        "judge plug-in file missing",
        ["--judge", "./nowhere-judge.py:Judge"],
        r"The judge file nowhere-judge\.py does not exist",
    ),
    ("model to evaluate missing", ["--evaluate-model", "./nowhere"], r"The model path ./nowhere does not exist"),
    (
        "device not on this machine",
        ["--device-map", '{"model.embed_tokens": "cpu", "model.layers": "cuda:99", "model.norm": "cpu", "lm_head": "cpu"}'],
        r"--device-map names cuda:99, which is not available here \(this machine has .*\); use --device-map auto or "
        r"--device-map cpu\.$",
    ),
]


@pytest.mark.parametrize(
    ("extra", "pattern"), [case[1:] for case in LATE_SETTINGS_CASES], ids=[case[0] for case in LATE_SETTINGS_CASES]
)
def test_late_settings(extra: list[str], pattern: str, model: Path, precious: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = snapshot(precious)
    code, text = run_cli([str(model), *PROMPT_FLAGS, *RUN_FLAGS, *extra], capsys)
    assert code == 2, text
    assert re.search(pattern, error_line(text)), error_line(text)
    assert snapshot(precious) == before and not partial_files(precious)


def test_gguf_cache_folder_is_a_file(
    model: Path, precious: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GGUF model is dequantized into the cache; a cache 'folder' that is a file ends in a sentence."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from heretic.export.gguf import export_gguf

    loaded = AutoModelForCausalLM.from_pretrained(model)
    gguf_model = export_gguf(loaded, AutoTokenizer.from_pretrained(model), precious / "models" / "tiny.f16.gguf", "f16")
    cache_file = write(precious / "cache-file", "not a folder")
    monkeypatch.setenv("HERETIC_CACHE_DIR", str(cache_file))
    before = snapshot(precious)
    code, text = run_cli([str(gguf_model), *PROMPT_FLAGS, *RUN_FLAGS], capsys)
    assert code == 2, text
    assert re.search(
        r"the dequantized GGUF cache in .*cache-file .*(Not a directory|File exists).*--cache-dir", error_line(text)
    ), error_line(text)
    assert snapshot(precious) == before and not partial_files(precious)


def test_gguf_cache_on_a_full_disk(
    model: Path, precious: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first load of a GGUF model writes its dequantized copy to the cache; a full cache disk ends
    in a sentence and leaves no partial copy behind."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from heretic.export.gguf import export_gguf

    loaded = AutoModelForCausalLM.from_pretrained(model)
    gguf_model = export_gguf(loaded, AutoTokenizer.from_pretrained(model), precious / "models" / "tiny.f16.gguf", "f16")
    with tmpfs(precious / "cache-disk", "1m") as cache:
        fill(cache, 16 * 1024)
        monkeypatch.setenv("HERETIC_CACHE_DIR", str(cache))
        before = snapshot(precious, skip=())
        code, text = run_cli([str(gguf_model), *PROMPT_FLAGS, *RUN_FLAGS], capsys)
        assert code == 2, text
        assert re.search(
            r"There is not enough disk space to write the dequantized GGUF cache in .*cache-disk \(No space left on device\); nothing was written.*--cache-dir",
            error_line(text),
        ), error_line(text)
        after = snapshot(precious, skip=())
        assert {k: v for k, v in after.items() if k != "cache-disk/gguf"} == before and not partial_files(precious)


# --- Fast cases: prompt files ------------------------------------------------------------------

HARMFUL = (ROOT / "src" / "heretic" / "data" / "prompts" / "harmful_train.txt").read_text().splitlines()[:12]


def _parquet_claim(t: Path) -> str:
    return str(write(t / "prompts.parquet", "\n".join(HARMFUL)))


def _csv_columns(t: Path) -> str:
    return str(write(t / "p.csv", "id,category\n1,a\n2,b\n"))


# (id, setup(tmp_path) -> --harmful-prompts value, exit code, regex)
PROMPT_CASES: list[tuple[str, Callable[[Path], str], int, str]] = [
    (
        "jsonl bad line",
        lambda t: str(write(t / "p.jsonl", '{"prompt": "a"}\n{"prompt": "b"\n{"prompt": "c"}\n')),
        2,
        r"p\.jsonl is not valid JSON Lines \(line 2: .*\); write one JSON value per line",
    ),
    (
        "jsonl mixes strings and objects",
        lambda t: str(write(t / "p.jsonl", '"a"\n{"prompt": "b"}\n')),
        2,
        r"p\.jsonl mixes prompts and objects",
    ),
    (
        "json object not list",
        lambda t: str(write(t / "p.json", '{"prompt": "a"}')),
        2,
        r"p\.json has no column|p\.json must hold a list",
    ),
    ("json truncated", lambda t: str(write(t / "p.json", '["a", "b"')), 2, r"p\.json is not valid JSON"),
    ("parquet that is text", _parquet_claim, 2, r"prompts\.parquet is not a Parquet file"),
    ("csv several columns", _csv_columns, 2, r"p\.csv has several columns \(id, category\); name the prompt column"),
    (
        "csv with NUL bytes",
        lambda t: str(write(t / "p.csv", b"prompt\nabc\x00def\n")),
        2,
        r"p\.csv holds control characters \(prompt 1: 'abc\\x00def'\)",
    ),
    (
        "latin-1 text",
        lambda t: str(write(t / "p.txt", "caf\xe9 recipes\n".encode("latin-1"))),
        2,
        r"p\.txt is not UTF-8 text; save it as UTF-8",
    ),
    ("utf-16 text", lambda t: str(write(t / "p.txt", "\n".join(HARMFUL).encode("utf-16"))), 2, r"p\.txt is not UTF-8 text"),
    ("binary file", lambda t: str(write(t / "p.txt", bytes(range(256)) * 4)), 2, r"p\.txt is not UTF-8 text"),
    (
        "control characters",
        lambda t: str(write(t / "p.txt", "\n".join(HARMFUL[:10] + ["how to \x00\x1b[31m pick a lock"]))),
        2,
        r"p\.txt holds control characters \(prompt 11: .*\); remove them",
    ),
    ("empty file", lambda t: str(write(t / "p.txt", "\n\n")), 2, r"The prompt set .*p\.txt is empty"),
    ("missing file", lambda t: "./missing.txt", 2, r"The prompt file or folder ./missing\.txt does not exist"),
    ("split on a file", lambda t: str(write(t / "p.txt", "\n".join(HARMFUL))) + ":train", 2, r"has no splits; remove 'train'"),
    ("bad slice", lambda t: "bundled:harmful_train[1:x]", 2, r"Cannot read the slice '\[1:x\]'"),
    ("step slice", lambda t: "bundled:harmful_train[::2]", 2, r"Cannot read the slice '\[::2\]'"),
    (
        "bad split syntax",
        lambda t: "bundled:harmful train",
        2,
        r"Cannot read the prompt set 'bundled:harmful train'; write a bundled set like",
    ),
    ("unknown bundled set", lambda t: "bundled:harmful_all", 2, r"There is no bundled prompt set 'harmful_all'"),
    ("slice leaves nothing", lambda t: "bundled:harmful_train[5:5]", 2, r"is empty; check its source, split and slice"),
    ("folder that is no dataset", lambda t: str((t / "notdata").mkdir() or t / "notdata"), 2, r"Cannot read the dataset folder"),
    (
        "huge prompt",
        lambda t: str(write(t / "p.txt", "\n".join(HARMFUL[:11] + ["lock " * 20_000]))),
        2,
        r"is [\d,]+ tokens long, more than the 512 this model can read at once; shorten it",
    ),
]


@pytest.mark.parametrize(
    ("setup", "code", "pattern"), [case[1:] for case in PROMPT_CASES], ids=[case[0] for case in PROMPT_CASES]
)
def test_prompt_files(
    setup: Callable[[Path], str], code: int, pattern: str, model: Path, precious: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = setup(precious)
    before = snapshot(precious)
    argv = [str(model), *PROMPT_FLAGS, *RUN_FLAGS]
    argv[argv.index("--harmful-prompts") + 1] = source
    returned, text = run_cli(argv, capsys)
    assert returned == code, text
    assert re.search(pattern, error_line(text)), error_line(text)
    assert snapshot(precious) == before and not partial_files(precious)


# --- Fast cases: reproduction records ----------------------------------------------------------


def _record() -> dict:
    return {
        "record_version": 1,
        "tool": {"name": "heretic", "version": "0.1.0"},
        "environment": {"python": "3", "libraries": {}},
        "model": {"name": "x", "kind": "local", "gguf_file": None},
        "settings": {"model": "x", "n_trials": 3},
        "prompt_sets": {name: {"sha256": "0" * 64} for name in ("harmful", "harmless", "harmful_eval", "harmless_eval")},
        "directions_sha256": "0" * 64,
        "trial": {
            "number": 3,
            "parameters": {
                "direction_scope": "global",
                "direction_index": 2.5,
                "kernels": {
                    "attn": {"max_weight": 1.0, "max_weight_position": 2.0, "min_weight": 0.5, "min_weight_distance": 1.0}
                },
            },
        },
    }


def _edited(edit: Callable[[dict], None]) -> Callable[[Path], str]:
    def setup(t: Path) -> str:
        data = _record()
        edit(data)
        return str(write(t / "saved" / "heretic.json", json.dumps(data)))

    return setup


# (id, setup(tmp_path) -> --reproduce value, regex); all exit 2.
RECORD_CASES: list[tuple[str, Callable[[Path], str], str]] = [
    ("record missing", lambda t: "./saved/heretic.json", r"The reproduction record saved/heretic\.json does not exist"),
    ("folder without record", lambda t: str((t / "plain").mkdir() or t / "plain"), r"plain/heretic\.json does not exist"),
    ("record not json", lambda t: str(write(t / "heretic.json", "{ oops")), r"heretic\.json is not valid JSON \(line 1"),
    (
        "record is a list",
        lambda t: str(write(t / "heretic.json", "[1, 2]")),
        r"is not a Heretic reproduction record this version can read",
    ),
    (
        "record of another version",
        _edited(lambda d: d.update(record_version=99)),
        r"is not a Heretic reproduction record this version can read",
    ),
    (
        "missing trial parameters",
        _edited(lambda d: d["trial"].pop("parameters")),
        r"is damaged: the field 'trial\.parameters' is missing",
    ),
    ("missing directions digest", _edited(lambda d: d.pop("directions_sha256")), r"the field 'directions_sha256' is missing"),
    (
        "missing prompt digest",
        _edited(lambda d: d["prompt_sets"].pop("harmless_eval")),
        r"the field 'prompt_sets\.harmless_eval\.sha256' is missing",
    ),
    (
        "trial number as text",
        _edited(lambda d: d["trial"].update(number="three")),
        r"the field 'trial\.number' should be int, not str",
    ),
    ("settings not an object", _edited(lambda d: d.update(settings=[1])), r"the field 'settings' should be object, not list"),
    (
        "kernel weight as text",
        _edited(lambda d: d["trial"]["parameters"]["kernels"]["attn"].update(max_weight="high")),
        r"kernels\.attn\.max_weight' should be a number",
    ),
    (
        "invalid recorded setting",
        _edited(lambda d: d["settings"].update(n_trials=-3)),
        r"The reproduction record's setting 'n_trials' is invalid",
    ),
]


@pytest.mark.parametrize(("setup", "pattern"), [case[1:] for case in RECORD_CASES], ids=[case[0] for case in RECORD_CASES])
def test_reproduction_records(
    setup: Callable[[Path], str], pattern: str, precious: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argument = setup(precious)
    before = snapshot(precious)
    code, text = run_cli(["--reproduce", argument], capsys)
    assert code == 2, text
    assert re.search(pattern, error_line(text)), error_line(text)
    assert snapshot(precious) == before and not partial_files(precious)


def test_huge_prompt_is_refused_below_a_long_context(model: Path, precious: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A model whose context is far longer than a sane prompt still gets no more than 8192 tokens at once:
    one 100,000-character prompt is refused with a sentence before it reaches the model."""
    folder = precious / "long-context"
    shutil.copytree(model, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, max_position_embeddings=1_000_000)))
    prompts = write(precious / "p.txt", "\n".join(HARMFUL[:11] + [("lock " * 20_000)[:100_000]]))
    argv = [str(folder), *PROMPT_FLAGS, *RUN_FLAGS]
    argv[argv.index("--harmful-prompts") + 1] = str(prompts)
    before = snapshot(precious)
    code, text = run_cli(argv, capsys)
    assert code == 2, text
    assert re.search(r"is [\d,]+ tokens long, more than the 8,192 this model can read at once", error_line(text)), error_line(
        text
    )
    assert snapshot(precious) == before


# --- Checkpoint journal: recovery, stale locks, one run per checkpoint (fast, no model) ---------

OPTUNA_QUIET = "import optuna; optuna.logging.set_verbosity(optuna.logging.WARNING)\n"


def _journal_with_trials(directory: Path, n: int) -> Path:
    """A journal with `n` finished trials, written by a separate process (this one keeps no lock on it)."""
    script = OPTUNA_QUIET + textwrap.dedent(
        f"""
        from pathlib import Path
        from heretic.search import checkpoint
        path = Path({str(directory / "m-0123456789ab.jsonl")!r})
        study, _ = checkpoint.load_or_create(path, "fp", {{}})
        for _ in range({n}):
            trial = study.ask()
            trial.suggest_float("x", 0, 1)
            study.tell(trial, [1.0, 2.0])
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    return directory / "m-0123456789ab.jsonl"


def _resume(directory: Path, relative: bool = False, timeout: float = 60) -> subprocess.CompletedProcess:
    """Open the journal again in a fresh process and add one trial; prints the number of finished trials."""
    path = "checkpoints/m-0123456789ab.jsonl" if relative else str(directory / "m-0123456789ab.jsonl")
    script = OPTUNA_QUIET + textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from optuna.trial import TrialState
        from heretic.errors import HereticError
        from heretic.search import checkpoint
        started = time.monotonic()
        try:
            study, _ = checkpoint.load_or_create(Path({path!r}), "fp", {{}})
        except HereticError as error:
            raise SystemExit("Error: " + str(error))
        trial = study.ask()
        trial.suggest_float("x", 0, 1)
        study.tell(trial, [1.0, 2.0])
        print("finished", len(study.get_trials(states=(TrialState.COMPLETE,))), "in", round(time.monotonic() - started, 1))
        """
    )
    return subprocess.run([sys.executable, "-c", script], cwd=directory.parent, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow  # a subprocess per case
@pytest.mark.parametrize("damage", ["cut last line", "garbage last line", "newline missing"])
def test_journal_cut_short_at_its_last_line_is_recovered(damage: str, tmp_path: Path) -> None:
    """What a crash or a full disk leaves: every complete trial is recovered, the damaged file is kept
    byte-identical beside it, the user is told how many records were dropped, and the search goes on."""
    journal = _journal_with_trials(tmp_path / "checkpoints", 3)
    data = journal.read_bytes()
    damaged = {
        "cut last line": data[:-25],
        "garbage last line": data + b"\x00\x00garbage\n",
        "newline missing": data[:-1],
    }[damage]
    journal.write_bytes(damaged)
    result = _resume(tmp_path / "checkpoints")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stdout + result.stderr
    report = one_sentence(result.stdout)
    dropped = 0 if damage == "newline missing" else 1
    recovered = 2 if damage == "cut last line" else 3  # the cut line was the third trial's COMPLETE record
    assert f"recovered {recovered} finished trial" in report and f"dropped {dropped} incomplete log record" in report, report
    assert f"finished {recovered + 1} " in report
    (aside,) = (tmp_path / "checkpoints").glob("*.damaged-*.jsonl")
    assert aside.read_bytes() == damaged
    assert journal.read_bytes().endswith(b"\n") and not partial_files(tmp_path)


@pytest.mark.slow  # a subprocess per case
def test_journal_damaged_before_its_last_line_is_refused_untouched(tmp_path: Path) -> None:
    journal = _journal_with_trials(tmp_path / "checkpoints", 2)
    lines = journal.read_bytes().split(b"\n")
    lines[2] = b"{not json"
    journal.write_bytes(b"\n".join(lines))
    before = snapshot(tmp_path)
    result = _resume(tmp_path / "checkpoints")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert re.search(r"is damaged at line 3 \(not just its last line\); move it away", one_sentence(result.stderr))
    assert snapshot(tmp_path) == before


@pytest.mark.slow  # a subprocess per case
@pytest.mark.parametrize("relative", [True, False], ids=["relative dir", "absolute dir"])
@pytest.mark.parametrize("lock", ["symlink", "file"])
def test_stale_journal_lock_after_a_kill_is_released_at_once(relative: bool, lock: str, tmp_path: Path) -> None:
    """kill -9 during a journal write leaves `<journal>.lock` behind (Optuna's symlink lock, or its
    open-file lock). The resumed run holds the checkpoint's run lock, so the journal lock is stale:
    it is removed at once instead of spinning (relative folder: forever; absolute: 30 s)."""
    journal = _journal_with_trials(tmp_path / "checkpoints", 2)
    stale = Path(str(journal) + ".lock")
    if lock == "symlink":
        stale.symlink_to("checkpoints/" + journal.name)  # what a relative --checkpoint-dir left: it never resolves
    else:
        stale.write_text("")
    result = _resume(tmp_path / "checkpoints", relative=relative, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    seconds = float(result.stdout.split()[-1])
    assert result.stdout.startswith("finished 3 ") and seconds < 10, result.stdout
    assert not stale.exists() and not stale.is_symlink()


@pytest.mark.slow  # a subprocess per case
def test_second_process_on_one_checkpoint_is_refused(tmp_path: Path) -> None:
    journal = _journal_with_trials(tmp_path / "checkpoints", 1)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            import sys, time
            from pathlib import Path
            from heretic.search import checkpoint
            checkpoint.claim(Path({str(journal)!r}))
            print("holding", flush=True)
            time.sleep(120)
            """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        before = snapshot(tmp_path)
        result = _resume(tmp_path / "checkpoints")
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert re.search(
            r"Another Heretic run is using the checkpoint .*m-0123456789ab\.jsonl; wait for it to finish, stop it, or choose another --checkpoint-dir",
            one_sentence(result.stderr),
        )
        assert snapshot(tmp_path) == before
    finally:
        holder.kill()
        holder.wait()
    # kill -9 released it: the next run goes on.
    assert _resume(tmp_path / "checkpoints").stdout.startswith("finished 2 ")


# --- Slow cases: a finished search, then outputs into broken places -----------------------------


def faults_slow(test: Callable) -> Callable:
    """Left out of the default run (make test-faults runs it); also `slow`, so `-m "not slow"` leaves it out."""
    return pytest.mark.slow(pytest.mark.faults_slow(test))


def cli_argv(model: Path, checkpoints: Path, *extra: str) -> list[str]:
    argv = [str(model), *PROMPT_FLAGS, *RUN_FLAGS, *extra]
    argv[argv.index("--checkpoint-dir") + 1] = str(checkpoints)
    return argv


@pytest.fixture(scope="module")
def searched(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A finished two-trial search (its checkpoint folder) and a reference save of its chosen trial."""
    root = tmp_path_factory.mktemp("searched")
    script = [sys.executable, "-m", "heretic", *cli_argv(tiny_models["llama"], root / "checkpoints", "--n-trials", "2")]
    script[script.index("--action") + 1] = "save"
    subprocess.run([*script, "--output-dir", str(root / "reference")], check=True, capture_output=True, timeout=600, cwd=root)
    return {"checkpoints": root / "checkpoints", "reference": root / "reference"}


def copied_checkpoints(searched: dict[str, Path], tmp_path: Path) -> Path:
    target = tmp_path / "checkpoints"
    shutil.copytree(searched["checkpoints"], target, ignore=shutil.ignore_patterns("*.lock"))
    return target


def journal_of(checkpoints: Path) -> Path:
    (journal,) = [path for path in checkpoints.glob("*.jsonl") if ".old." not in path.name and ".damaged-" not in path.name]
    return journal


def finished_trials(journal: Path) -> int:
    count = 0
    for line in journal.read_bytes().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        count += record.get("op_code") == 6 and record.get("state") == 1
    return count


def keeps_trials(journal: Path, before: bytes) -> None:
    """The journal still holds every byte it held before (a resumed run only appends to it)."""
    assert journal.read_bytes().startswith(before)


def page_rounded(size: int) -> int:
    return -(-size // 4096) * 4096


# (id, action, place, regex); place: "ro" (read-only tmpfs), "full" (tmpfs with a few KiB left),
# "card" (room for the weights and tokenizer, not for the card and record). All exit 2.
OUTPUT_CASES = [
    (
        "merged model, read-only",
        "save",
        "ro",
        r"Cannot write the merged model .*/out/model \(Read-only file system\); nothing was written: choose a folder you can write to with --output-dir",
    ),
    ("adapter, read-only", "save-adapter", "ro", r"Cannot write the adapter .*/out/model-adapter \(Read-only file system\)"),
    ("gguf, read-only", "gguf", "ro", r"Cannot write the GGUF file .*/out/model\.q8_0\.gguf \(Read-only file system\)"),
    (
        "merged model, full disk",
        "save",
        "full",
        r"There is not enough disk space to write the merged model .*/out/model \(No space left on device\); nothing was written: free some space, or choose a folder on another disk with --output-dir",
    ),
    ("adapter, full disk", "save-adapter", "full", r"not enough disk space to write the adapter .*/out/model-adapter"),
    ("gguf, full disk", "gguf", "full", r"not enough disk space to write the GGUF file .*/out/model\.q8_0\.gguf"),
    (
        "card and record, full disk",
        "save",
        "card",
        r"not enough disk space to write the merged model .*/out/model \(No space left on device\)",
    ),
]


@faults_slow
@pytest.mark.parametrize(
    ("action", "place", "pattern"), [case[1:] for case in OUTPUT_CASES], ids=[case[0] for case in OUTPUT_CASES]
)
def test_outputs(
    action: str,
    place: str,
    pattern: str,
    searched: dict[str, Path],
    model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    checkpoints = copied_checkpoints(searched, tmp_path)
    journal = journal_of(checkpoints)
    journal_before = journal.read_bytes()
    with tmpfs(tmp_path / "out", "2m") as out:
        write(out / "earlier" / "notes.txt", "keep me")
        if place == "ro":
            make_read_only(out)
        elif place == "full":
            fill(out, 8192)
        else:
            reference = searched["reference"]
            needed = sum(
                page_rounded(f.stat().st_size) for f in reference.iterdir() if f.name not in {"README.md", "heretic.json"}
            )
            fill(out, needed + 1024)
        before = snapshot(out)
        argv = cli_argv(model, checkpoints, "--output-dir", str(out / "model"))
        argv[argv.index("--action") + 1] = action
        code, text = run_cli(argv, capsys)
        assert code == 2, text
        assert re.search(pattern, error_line(text)), error_line(text)
        assert snapshot(out) == before and not partial_files(out)
    keeps_trials(journal, journal_before)
    assert finished_trials(journal) == 2


# (id, setup(tmp_path) -> extra argv, regex). All exit 2, with nothing changed.
PLACE_CASES: list[tuple[str, Callable[[Path], list[str]], str]] = [
    (
        "output dir is a file",
        lambda t: ["--action", "save", "--output-dir", str(write(t / "out.txt", "a file"))],
        r"out\.txt is a file, not a folder; choose another folder with --output-dir",
    ),
    (
        "output dir not empty",
        lambda t: ["--action", "save", "--output-dir", str(write(t / "full" / "x", "x").parent)],
        r"full already exists and is not empty; choose another folder or pass --overwrite",
    ),
    (
        "gguf target is a folder",
        lambda t: ["--action", "gguf", "--gguf-type", "f16", "--output-dir", str((t / "m.f16.gguf").mkdir() or t / "m")],
        r"m\.f16\.gguf is a folder, not a file; choose another --output-dir",
    ),
    (
        "checkpoint dir is a file",
        lambda t: ["--checkpoint-dir", str(write(t / "ck-file", "x"))],
        r"(Cannot write the checkpoint|A file stands where a folder is needed).*ck-file",
    ),
    ("no such trial", lambda t: ["--trial", "99"], r"There is no finished trial 99; choose one from the table above"),
]


@faults_slow
@pytest.mark.parametrize(("setup", "pattern"), [case[1:] for case in PLACE_CASES], ids=[case[0] for case in PLACE_CASES])
def test_places(
    setup: Callable[[Path], list[str]],
    pattern: str,
    searched: dict[str, Path],
    model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    checkpoints = copied_checkpoints(searched, tmp_path)
    extra = setup(tmp_path)
    argv = cli_argv(model, checkpoints)
    argv.remove("--action"), argv.remove("examples")
    before = snapshot(tmp_path)
    code, text = run_cli([*argv, *extra], capsys)
    assert code == 2, text
    assert re.search(pattern, error_line(text)), error_line(text)
    after = snapshot(tmp_path)
    journal = str(journal_of(checkpoints).relative_to(tmp_path))
    assert {k: v for k, v in after.items() if k != journal and ".run.lock" not in k} == {
        k: v for k, v in before.items() if k != journal
    }
    assert not partial_files(tmp_path)


@faults_slow
def test_read_only_checkpoint(searched: dict[str, Path], model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoints = copied_checkpoints(searched, tmp_path)
    before = snapshot(checkpoints)
    with read_only_bind(checkpoints):
        code, text = run_cli(cli_argv(model, checkpoints, "--resume", "add"), capsys)
    assert code == 2, text
    assert re.search(
        r"Cannot write the checkpoint .*\.jsonl \(Read-only file system\); make it writable or choose another --checkpoint-dir",
        error_line(text),
    ), error_line(text)
    assert snapshot(checkpoints) == before


@faults_slow
def test_full_disk_during_the_search_keeps_every_finished_trial(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The checkpoint's disk fills up in the middle of the search: one sentence, and after space is
    freed the same command recovers every finished trial and goes on."""
    with tmpfs(tmp_path / "checkpoints", "1m") as checkpoints:
        fill(checkpoints, 12 * 1024)
        code, text = run_cli(cli_argv(model, checkpoints, "--n-trials", "20"), capsys)
        assert code == 2, text
        assert re.search(
            r"The disk holding the checkpoint .*\.jsonl is full \(No space left on device\); every finished trial is kept: free some space and rerun the same command",
            error_line(text),
        ), error_line(text)
        journal = journal_of(checkpoints)
        done = finished_trials(journal)
        (checkpoints / ".filler").unlink()
        code, text = run_cli(cli_argv(model, checkpoints, "--n-trials", str(done + 1)), capsys)
        assert code == 0, text
        assert finished_trials(journal_of(checkpoints)) >= done + 1
        assert not partial_files(checkpoints)


@faults_slow
@pytest.mark.parametrize("damage", ["cut", "garbage"])
def test_resume_add_after_a_cut_journal(
    damage: str, searched: dict[str, Path], model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The reported bug: `--resume add` on a journal cut at its last line appended onto the partial
    line and every later run said the journal 'cannot be read'."""
    checkpoints = copied_checkpoints(searched, tmp_path)
    journal = journal_of(checkpoints)
    data = journal.read_bytes()
    damaged = data[:-30] if damage == "cut" else data + b'{"op_code": 6, "trial_id"'
    journal.write_bytes(damaged)
    code, text = run_cli(cli_argv(model, checkpoints, "--resume", "add"), capsys)
    assert code == 0, text
    assert re.search(r"recovered \d finished trials?, dropped 1 incomplete log record", one_sentence(text)), text
    (aside,) = checkpoints.glob("*.damaged-*.jsonl")
    assert aside.read_bytes() == damaged
    total = finished_trials(journal)
    code, text = run_cli(cli_argv(model, checkpoints, "--resume", "add"), capsys)
    assert code == 0 and "cannot be read" not in text and finished_trials(journal) == total + 1


@faults_slow
def test_journal_damaged_in_the_middle_is_refused(
    searched: dict[str, Path], model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoints = copied_checkpoints(searched, tmp_path)
    journal = journal_of(checkpoints)
    lines = journal.read_bytes().split(b"\n")
    lines[3] = b"garbage"
    journal.write_bytes(b"\n".join(lines))
    before = snapshot(checkpoints)
    code, text = run_cli(cli_argv(model, checkpoints), capsys)
    assert code == 2 and re.search(r"is damaged at line 4 \(not just its last line\)", error_line(text)), text
    assert {k: v for k, v in snapshot(checkpoints).items() if ".run.lock" not in k} == before


@faults_slow
def test_token_is_never_written(
    searched: dict[str, Path], model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """HF_TOKEN set in the environment appears in no file written (output, checkpoint, cache) and in no output."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", TOKEN)
    checkpoints = copied_checkpoints(searched, tmp_path)
    argv = cli_argv(
        model,
        checkpoints,
        "--resume",
        "add",
        "--output-dir",
        str(tmp_path / "out" / "model"),
        "--action",
        "save",
        "--action",
        "save-adapter",
        "--action",
        "gguf",
        "--gguf-type",
        "f16",
        "--log-level",
        "DEBUG",
    )
    code, text = run_cli(argv, capsys)
    assert code == 0, text
    assert TOKEN not in text
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert any(path.suffix == ".gguf" for path in written) and any(path.name == "heretic.json" for path in written)
    for path in written:
        assert TOKEN.encode() not in path.read_bytes(), path
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert path.stat().st_mode & 0o044 == 0o044, f"{path} is not readable by others: {oct(path.stat().st_mode)}"


# --- Slow cases: kills and signals at every stage ------------------------------------------------

STAGES = {
    "loading": "Architecture:",  # the model is loaded, prompts and directions are next
    "directions": "Refusal directions computed",  # the baseline is measured next
    "search": None,  # one trial finished, more running
    "saving": "Chosen trial",  # the merged model is being written
}


def start(model: Path, tmp_path: Path, n_trials: int = 40) -> tuple[subprocess.Popen, Path, list[str]]:
    command = [
        sys.executable,
        "-m",
        "heretic",
        *cli_argv(model, tmp_path / "checkpoints", "--n-trials", str(n_trials), "--output-dir", str(tmp_path / "out" / "model")),
    ]
    command[command.index("--action") + 1] = "save"
    log = tmp_path / "run.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")
    with log.open("w") as output:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=output, stderr=subprocess.STDOUT, preexec_fn=default_sigint
        )
    return process, log, command


def default_sigint() -> None:
    """Ctrl+C reaches the child even when the suite itself runs in the background, where a shell starts
    jobs with SIGINT ignored (and Python then keeps ignoring it, as it should for `nohup heretic &`)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for(stage: str, process: subprocess.Popen, log: Path, checkpoints: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        text = log.read_text()
        marker = STAGES[stage]
        if marker is None:
            found = checkpoints.is_dir() and any(finished_trials(j) >= 1 for j in checkpoints.glob("*.jsonl"))
        else:
            found = marker in text
        if found:
            return
        time.sleep(0.02)
    raise AssertionError(f"the run never reached {stage}: {log.read_text()[-3000:]}")


def check_outputs(tmp_path: Path) -> None:
    """No partial file anywhere; an output folder, if any, is complete."""
    assert not partial_files(tmp_path)
    folder = tmp_path / "out" / "model"
    if folder.exists():
        assert {"model.safetensors", "heretic.json", "README.md", "config.json"} <= {p.name for p in folder.iterdir()}


@faults_slow
@pytest.mark.parametrize("stage", list(STAGES))
def test_kill_at_every_stage(stage: str, model: Path, tmp_path: Path) -> None:
    """kill -9 at each stage, then the same command: it recovers every finished trial and completes."""
    process, log, command = start(model, tmp_path, n_trials=40 if stage == "search" else 2)
    wait_for(stage, process, log, tmp_path / "checkpoints")
    process.send_signal(signal.SIGKILL)
    process.wait()
    journals = list((tmp_path / "checkpoints").glob("*.jsonl"))
    done = finished_trials(journals[0]) if journals else 0
    check_outputs(tmp_path)
    command[command.index("--n-trials") + 1] = str(max(done, 2))
    command.append("--overwrite")
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stdout + result.stderr
    assert finished_trials(journal_of(tmp_path / "checkpoints")) >= max(done, 2)
    check_outputs(tmp_path)
    assert (tmp_path / "out" / "model" / "model.safetensors").is_file()


@faults_slow
@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_signal_at_every_stage(signum: int, stage: str, model: Path, tmp_path: Path) -> None:
    """Ctrl+C and SIGTERM behave alike: before the search, exit 130 with one sentence; during the search,
    the finished trials are kept and the chosen one is saved; during the save, either the save completes
    or nothing of it remains."""
    process, log, _ = start(model, tmp_path, n_trials=40 if stage == "search" else 2)
    wait_for(stage, process, log, tmp_path / "checkpoints")
    process.send_signal(signum)
    code = process.wait(timeout=300)
    text = log.read_text()
    assert "Traceback" not in text, text
    if stage == "search":
        assert code == 0 and "Search interrupted" in text, text
        assert finished_trials(journal_of(tmp_path / "checkpoints")) >= 1
        assert (tmp_path / "out" / "model" / "model.safetensors").is_file()
    elif stage == "saving":
        assert code in (0, 130), text
        if code == 130:
            assert "Interrupted; the search checkpoint keeps every finished trial." in one_sentence(text)
    else:
        assert code == 130, text
        assert "Error: Interrupted; the search checkpoint keeps every finished trial." in one_sentence(text)
    check_outputs(tmp_path)


@faults_slow
def test_two_runs_started_on_one_checkpoint(model: Path, tmp_path: Path) -> None:
    """The second of two runs on one checkpoint is refused with a sentence while the first searches; the
    first goes on (stopped here with SIGTERM: it keeps its trials and saves) and its journal is intact."""
    first, log, command = start(model, tmp_path, n_trials=200)
    wait_for("search", first, log, tmp_path / "checkpoints")
    second = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert first.poll() is None, "the first run ended before the second one started"
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stdout + second.stderr
    assert re.search(
        r"Another Heretic run is using the checkpoint .*\.jsonl; wait for it to finish", one_sentence(second.stderr)
    ), second.stderr
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=600) == 0, log.read_text()
    journal = journal_of(tmp_path / "checkpoints")
    assert finished_trials(journal) >= 1 and all(json.loads(line) for line in journal.read_text().splitlines())


def test_saved_files_get_ordinary_permissions(tmp_path: Path) -> None:
    """A writer that creates its files 0600 (as safetensors does) still leaves a folder other users and
    serving processes can read: files 0666 and folders 0777, less the umask."""
    from heretic.export.save import atomic_folder

    mask = os.umask(0o022)
    try:
        with atomic_folder(tmp_path / "model", overwrite=False) as staging:
            descriptor = os.open(staging / "model.safetensors", os.O_WRONLY | os.O_CREAT, 0o600)
            os.close(descriptor)
            (staging / "sub").mkdir(mode=0o700)
            (staging / "sub" / "x.json").write_text("{}")
    finally:
        os.umask(mask)
    assert oct((tmp_path / "model" / "model.safetensors").stat().st_mode & 0o777) == oct(0o644)
    assert oct((tmp_path / "model" / "sub").stat().st_mode & 0o777) == oct(0o755)
    assert oct((tmp_path / "model").stat().st_mode & 0o777) == oct(0o755)


@faults_slow
def test_huge_prompt_memory_stays_bounded(model: Path, tmp_path: Path) -> None:
    """The reported case, in a process limited to 3 GiB of address space: one 100,000-character prompt
    ends in a sentence, not in memory growing until the kernel kills the process."""
    import resource

    prompts = write(tmp_path / "p.txt", "\n".join(HARMFUL[:11] + [("pick a lock " * 10_000)[:100_000]]))
    command = [sys.executable, "-m", "heretic", *cli_argv(model, tmp_path / "checkpoints")]
    command[command.index("--harmful-prompts") + 1] = str(prompts)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300, preexec_fn=limit)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stdout + result.stderr
    assert re.search(r"is [\d,]+ tokens long, more than the 512 this model can read at once", one_sentence(result.stderr))
