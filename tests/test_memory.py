"""Memory: the process's and every GPU's, by stage (--print-memory), and out-of-memory errors that
name the stage and the setting that helps."""

from __future__ import annotations

import mmap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_faults import RUN_FLAGS, error_line, run_cli
from tiny import PROMPT_FLAGS

from heretic import session as session_module
from heretic.cli import EXIT_FAILURE, describe_unexpected
from heretic.model import memory
from heretic.model.memory import DeviceMemory, describe, out_of_memory_message, stage, stage_of


def test_the_process_peak_follows_an_allocation_and_resets() -> None:
    memory.reset_peaks()
    before = memory.process_memory()
    assert before.device == "cpu" and before.used > 0 and before.peak >= before.used
    # 64 MiB of fresh anonymous memory, every page touched (an allocator could instead hand back pages the
    # process already holds, and the resident size would not move).
    block = mmap.mmap(-1, 64 * 2**20)
    block.write(b"\x01" * len(block))
    during = memory.process_memory()
    block.close()
    after = memory.process_memory()
    assert during.used - before.used >= 60 * 2**20
    assert after.peak >= during.used - 8 * 2**20  # the peak keeps the freed block (the kernel's counters lag a little)
    memory.reset_peaks()
    reset = memory.process_memory()  # the peak starts again from what the process holds now
    assert reset.peak <= reset.used + 8 * 2**20 or not memory.CLEAR_REFS.exists()


def test_every_cuda_device_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two GPUs: both are listed (not only the first), after the process's RAM."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda index: (index + 1) * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda index: (index + 2) * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(total_memory=80 * 2**30))
    devices = memory.device_memory()
    assert [device.device for device in devices] == ["cpu", "cuda:0", "cuda:1"]
    line = describe("loading the model", devices)
    assert line.startswith("Memory after loading the model: RAM ")
    assert "cuda:0 1.00 GiB of 80.00 GiB (peak 2.00 GiB)" in line and "cuda:1 2.00 GiB of 80.00 GiB (peak 3.00 GiB)" in line


def test_describe_names_each_device() -> None:
    devices = [DeviceMemory("cpu", 3 * 2**29, 2**31)]
    assert describe("saving the merged model", devices) == "Memory after saving the merged model: RAM 1.50 GiB (peak 2.00 GiB)"


def test_a_stage_reports_its_memory_and_names_errors_raised_in_it() -> None:
    lines: list[str] = []
    memory.set_reporter(lines.append)
    try:
        with stage("loading the model"):
            pass
        with pytest.raises(MemoryError) as caught, stage("running trial 3"), stage("scoring the original model"):
            raise MemoryError
    finally:
        memory.set_reporter(None)
    assert lines[0].startswith("Memory after loading the model: RAM")
    assert len(lines) == 1  # a stage that fails is not reported: the error names it
    assert stage_of(caught.value) == "scoring the original model"  # the innermost stage
    assert memory.current_stage() is None


@pytest.mark.parametrize(
    ("stage_name", "setting"),
    [
        ("loading the model", "--max-memory or --device-map"),
        ("choosing the batch size", "--batch-size"),
        ("computing the refusal directions", "--max-batch-size"),
        ("running trial 7", "--batch-size or --max-batch-size"),
        ("saving the merged model", "save-adapter"),
        (None, "--batch-size"),
    ],
)
def test_out_of_memory_names_the_stage_and_the_setting(stage_name: str | None, setting: str) -> None:
    message = out_of_memory_message(stage_name)
    assert message.startswith(f"Out of memory while {stage_name};" if stage_name else "Out of memory;")
    assert setting in message and message.count(".") <= 2 and "\n" not in message


def test_cli_describes_a_torch_out_of_memory_error_with_its_stage() -> None:
    error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with pytest.raises(torch.OutOfMemoryError) as caught, stage("computing the refusal directions"):
        raise error
    message = describe_unexpected(caught.value)
    assert message is not None and message.startswith("Out of memory while computing the refusal directions;")


def test_running_out_of_memory_in_a_stage_ends_in_one_sentence(
    tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def exhausted(*args: object, **kwargs: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(session_module, "compute_directions", exhausted)
    code, text = run_cli([str(tiny_models["llama"]), *PROMPT_FLAGS, *RUN_FLAGS], capsys)
    assert code == EXIT_FAILURE
    assert error_line(text).startswith("Out of memory while computing the refusal directions; lower --max-batch-size")


@pytest.mark.slow
def test_print_memory_reports_every_stage(tiny_models: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, text = run_cli([str(tiny_models["llama"]), *PROMPT_FLAGS, *RUN_FLAGS, "--print-memory"], capsys)
    assert code == 0, text
    flat = " ".join(text.split())
    for name in ("loading the model", "choosing the batch size", "computing the refusal directions"):
        assert f"Memory after {name}: RAM" in flat
    assert "Memory after scoring the original model: RAM" in flat and "Memory after running trial 0: RAM" in flat


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_the_footprint_counts_the_models_parameters(kind: str) -> None:
    """The estimate's weights term is computed from the configuration: it counts the parameters a model
    of that configuration has (tiny models; biases and extra norms aside, which these have none of)."""
    from tiny import make_model

    from heretic.model.footprint import Shape, search_memory

    model = make_model(kind)
    config = model.config.get_text_config()
    shape = Shape.of(config)
    counted = sum(p.numel() for p in model.parameters())
    assert abs(shape.parameters - counted) <= 4 * shape.hidden * shape.layers, (shape.parameters, counted)
    terms = search_memory(shape, 2, batch=8, prompt_tokens=10, response_tokens=6)
    assert terms["weights"] == shape.parameters * 2
    assert terms["cache"] == 8 * 16 * shape.layers * 2 * shape.kv_heads * shape.head_dim * 2
    doubled = search_memory(shape, 2, batch=16, prompt_tokens=10, response_tokens=6)
    assert doubled["cache"] == 2 * terms["cache"] and doubled["weights"] == terms["weights"]
