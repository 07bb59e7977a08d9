"""The search end to end: headless runs, a real process kill and resume, checkpoint safety."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState
from tiny import PROMPT_FLAGS, SCORING_FLAGS, make_model

from heretic.ablation.adapters import Ablator
from heretic.ablation.kernels import ablated_matrices
from heretic.ablation.parameters import AblationParameters, ComponentKernel
from heretic.cli import settings_from_argv
from heretic.directions import orthonormal_rows
from heretic.model.architecture import as_matrices, build_architecture_map
from heretic.search.checkpoint import open_storage
from heretic.search.space import LayerRanges, suggest_parameters

pytestmark = pytest.mark.slow


def heretic_command(model: Path, checkpoints: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "heretic",
        str(model),
        *PROMPT_FLAGS,
        *SCORING_FLAGS,
        "--n-trials",
        "6",
        "--n-startup-trials",
        "3",
        "--checkpoint-dir",
        str(checkpoints),
        "--headless",
        *extra,
    ]


def current_study(checkpoints: Path) -> optuna.Study:
    """The search in the folder's current journal (archived ones, *.old.jsonl, left out)."""
    (journal,) = [path for path in checkpoints.glob("*.jsonl") if ".old." not in path.name]
    return optuna.load_study(study_name="heretic", storage=open_storage(journal))


def study_trials(checkpoints: Path) -> list[tuple]:
    study = current_study(checkpoints)
    return [(t.number, t.state.name, t.params, t.values, t.user_attrs.get("cut")) for t in study.get_trials(deepcopy=False)]


SET_TRIAL_STATE = 6  # the op code of "set trial state and values" in Optuna's journal file format


def completed(checkpoints: Path) -> int:
    """Completed trials of the current journal, counted straight from its lines: fast enough to poll
    between trials."""
    count = 0
    for journal in (path for path in checkpoints.glob("*.jsonl") if ".old." not in path.name):
        for line in journal.read_text().splitlines():
            try:
                op = json.loads(line)
            except json.JSONDecodeError:  # the last line may be mid-write
                continue
            if op.get("op_code") == SET_TRIAL_STATE and op.get("state") == TrialState.COMPLETE.value:
                count += 1
    return count


# `python -c PAUSED_HERETIC N ARGS...` runs `heretic ARGS...` and stops itself (SIGSTOP) when trial N
# (counted from 0) starts scoring: trials 0..N-1 are finished and trial N is running in the journal.
PAUSED_HERETIC = """
import os, signal, sys
from heretic.cli import main
from heretic.scoring.evaluator import Evaluator

pause_at, kl, calls = int(sys.argv[1]), Evaluator.kl, []

def paused_kl(self):
    if len(calls) == pause_at:
        os.kill(os.getpid(), signal.SIGSTOP)
    calls.append(1)
    return kl(self)

Evaluator.kl = paused_kl
main(sys.argv[2:])
"""


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.mark.parametrize("kind", ["llama", "qwen3_moe"])
def test_killed_search_resumes_to_the_same_study(kind: str, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    model = tiny_models[kind]
    # Uninterrupted reference run.
    reference = run(heretic_command(model, tmp_path / "uninterrupted"), tmp_path)
    assert "Pareto front" in reference.stdout and "Chosen trial" in reference.stdout
    expected = [t for t in study_trials(tmp_path / "uninterrupted") if t[1] == "COMPLETE"]
    assert len(expected) == 6

    # Same command, killed with SIGKILL while its fourth trial runs (it stops itself there, so the kill
    # never races the end of the search), then run again.
    killed_dir = tmp_path / "killed"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    command = [sys.executable, "-c", PAUSED_HERETIC, "3", *heretic_command(model, killed_dir)[3:]]
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status = os.waitpid(process.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), "the run ended before it could be killed: " + process.stderr.read().decode()
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished_before = completed(killed_dir)
    assert 3 <= finished_before < 6 and finished_before == 3
    assert [t[1] for t in study_trials(killed_dir)][3] == "RUNNING"  # killed mid-trial

    resumed = run(heretic_command(model, killed_dir), tmp_path)
    assert f"{finished_before} finished trials" in resumed.stdout
    after = [t for t in study_trials(killed_dir) if t[1] == "COMPLETE"]
    assert [(t[2], t[3], t[4]) for t in after] == [(t[2], t[3], t[4]) for t in expected]


def test_different_settings_never_mix_checkpoints(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"
    run(heretic_command(tiny_models["llama"], checkpoints, "--n-trials", "2"), tmp_path)
    (first,) = checkpoints.glob("*.jsonl")
    run(heretic_command(tiny_models["llama"], checkpoints, "--n-trials", "2", "--max-response-length", "6"), tmp_path)
    (second,) = set(checkpoints.glob("*.jsonl")) - {first}  # one file per model and settings
    # The first settings' journal put where the second settings look for theirs is refused, not mixed.
    first.replace(second)
    result = subprocess.run(
        heretic_command(tiny_models["llama"], checkpoints, "--n-trials", "2", "--max-response-length", "6"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 2 and "different settings" in result.stderr and "Traceback" not in result.stderr


def test_add_and_restart(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"
    run(heretic_command(tiny_models["llama"], checkpoints, "--n-trials", "2"), tmp_path)
    result = run(heretic_command(tiny_models["llama"], checkpoints, "--n-trials", "2", "--resume", "add"), tmp_path)
    assert "running up to 4" in result.stdout and completed(checkpoints) == 4
    result = run(heretic_command(tiny_models["llama"], checkpoints, "--n-trials", "1", "--resume", "restart"), tmp_path)
    assert "moved to" in result.stdout, result.stdout
    assert completed(checkpoints) == 1
    assert len(list(checkpoints.glob("*.old.jsonl"))) == 1  # the old search is kept aside


def test_a_spent_time_budget_starts_no_new_trial_and_the_same_command_continues(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    checkpoints = tmp_path / "checkpoints"
    command = heretic_command(tiny_models["llama"], checkpoints, "--search-minutes", "0.0001")
    first = run(command, tmp_path)
    assert "time budget (0.0001 min) is spent: 1 of 6 trials finished" in " ".join(first.stdout.split())
    assert completed(checkpoints) == 1 and "Pareto front" in first.stdout  # the run goes on to the front
    assert re.search(r"Trial +0 .* eta 0s ", first.stdout), first.stdout  # the estimate counts with the budget
    run(command, tmp_path)
    assert completed(checkpoints) == 2


def test_a_time_budget_starts_no_trial_that_would_end_after_it() -> None:
    """Once a trial of this run has finished, another starts only if it ends before the deadline at the
    median time of the last trials; before that, only the deadline counts."""
    import time

    from heretic.search.study import budget_fits, budget_left

    study = optuna.create_study(directions=["minimize", "minimize"])
    for seconds in (30.0, 40.0, 50.0):
        trial = study.ask()
        for name, value in {"refusals": 1, "kl": 0.1, "seconds": seconds}.items():
            trial.set_user_attr(name, value)
        study.tell(trial, [1.0, 0.1])
    now = time.perf_counter()
    assert budget_fits(study, 2, now + 45.0)  # the median, 40 s, ends before the deadline
    assert not budget_fits(study, 2, now + 35.0)  # it would end after it
    assert budget_fits(study, 3, now + 5.0)  # no trial of this run yet: the deadline alone counts
    assert not budget_fits(study, 3, now - 1.0)
    # The estimate shown counts whole trials: 100 s left hold two of 40 s.
    assert 79.0 < budget_left(study, time.perf_counter() + 100.0) <= 80.0
    assert budget_left(study, time.perf_counter() + 35.0) == 0.0


def study_batch_size(checkpoints: Path, value: int | None = None) -> int:
    """The batch size stored with the search (first replaced by value, if given)."""
    study = current_study(checkpoints)
    if value is not None:
        study.set_user_attr("batch_size", value)
    return study.user_attrs["batch_size"]


def test_fused_experts_search_resumes_under_either_exactness_setting(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """Fused MoE experts keep the approximated full ablation whatever --full-normalization-exact says, so a
    search started with the approximation (every search before the exact ablation existed) continues under
    the default."""
    checkpoints = tmp_path / "checkpoints"
    model = tiny_models["qwen3_moe"]
    run(heretic_command(model, checkpoints, "--n-trials", "1", "--no-full-normalization-exact"), tmp_path)
    run(heretic_command(model, checkpoints, "--n-trials", "2", "--resume", "continue"), tmp_path)
    assert len(list(checkpoints.glob("*.jsonl"))) == 1 and completed(checkpoints) == 2


def test_resumed_search_reuses_its_batch_size(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"
    auto = ("--batch-size", "0", "--max-batch-size", "4")
    first = run(heretic_command(tiny_models["llama"], checkpoints, "--n-trials", "1", *auto), tmp_path)
    assert "tokens/s by batch size" in first.stdout  # measured on a fresh search
    assert study_batch_size(checkpoints) in (1, 2, 4)

    # A value the measurement never returns proves that the resumed run reads it from the checkpoint.
    study_batch_size(checkpoints, 3)
    resumed = run(heretic_command(tiny_models["llama"], checkpoints, "--n-trials", "1", "--resume", "add", *auto), tmp_path)
    assert "Batch size 3 (the one the checkpoint's trials ran with" in resumed.stdout, resumed.stdout
    assert "tokens/s by batch size" not in resumed.stdout and completed(checkpoints) == 2

    # --batch-size wins, and the search then continues with it; restart measures afresh.
    run(heretic_command(tiny_models["llama"], checkpoints, "--n-trials", "1", "--resume", "add", "--batch-size", "2"), tmp_path)
    assert study_batch_size(checkpoints) == 2
    restarted = run(heretic_command(tiny_models["llama"], checkpoints, "--n-trials", "1", "--resume", "restart", *auto), tmp_path)
    assert "tokens/s by batch size" in restarted.stdout


@pytest.mark.parametrize("kind", ["qwen3_moe", "qwen2_moe", "llama"])
@pytest.mark.parametrize(("mode", "exact"), [("none", True), ("pre", True), ("full", True), ("full", False)])
def test_adapters_reproduce_the_explicit_ablation(kind: str, mode: str, exact: bool) -> None:
    """Every target, fused expert tensors included, computes with the ablated matrix: M + BA, or for an exact
    full ablation (no fused tensors) diag(s) (M + BA)."""
    model = make_model(kind)
    arch = build_architecture_map(model)
    originals = {
        t.name: as_matrices(getattr(model.get_submodule(t.module), t.parameter), t).clone() for _, _, t in arch.targets()
    }
    directions = torch.nn.functional.normalize(
        torch.randn(arch.num_layers + 1, 64, generator=torch.Generator().manual_seed(0)), dim=-1
    )
    parameters = AblationParameters(
        "per-layer", 0.0, {"attn": ComponentKernel(1.0, 2.0, 0.5, 2.0), "mlp": ComponentKernel(0.8, 3.0, 0.4, 2.0)}
    )
    ablator = Ablator(model, arch, mode, rank=64, seed=0, exact=exact)  # full rank: the approximation is exact
    assert ablator.exact == (mode == "full" and exact and kind == "llama")
    ablator.apply(parameters, directions)
    merged = ablator.merged_state_dict(parameters, directions)
    for layer, component, target in arch.targets():
        weight = parameters.weight(component, layer)
        expected = (
            ablated_matrices(originals[target.name], directions[layer + 1], weight, mode) if weight else originals[target.name]
        )
        got = as_matrices(merged[target.name], target)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        lora = ablator._lora_layers[target.name]  # the live adapter applies the same update
        delta = lora.get_delta_weight("default")
        delta = delta if not target.fused else (delta if target.out_axis == 1 else delta.transpose(1, 2))
        live = originals[target.name] + (delta if target.fused else delta.unsqueeze(0))
        scale = ablator._scales.get(target.name)
        assert (scale is not None) == (ablator.exact and weight != 0)
        live = live if scale is None else live * scale.unsqueeze(-1)
        torch.testing.assert_close(live, expected, atol=1e-4, rtol=1e-4)

    # The adapted model's forward equals a model whose weights hold the merged matrices.
    reference = make_model(kind)
    reference.load_state_dict(merged)
    tokens = torch.randint(0, 500, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, reference(tokens).logits, atol=1e-4, rtol=1e-4)
    with ablator.peft_model.disable_adapter(), torch.no_grad():  # the original (a judge's view): no scale either
        torch.testing.assert_close(model(tokens).logits, make_model(kind)(tokens).logits, atol=1e-5, rtol=1e-5)
    ablator.reset()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, make_model(kind)(tokens).logits, atol=1e-5, rtol=1e-5)


def test_checkpoint_journal_is_readable_json(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"
    run(heretic_command(tiny_models["llama"], checkpoints, "--n-trials", "1"), tmp_path)
    (journal,) = checkpoints.glob("*.jsonl")
    lines = [json.loads(line) for line in journal.read_text().splitlines()]
    assert lines and all(isinstance(line, dict) for line in lines)


@pytest.mark.parametrize("ranges", [None, LayerRanges((0.4, 1.0), (0.3, 1.0))])
def test_sampled_kernels_stay_in_the_search_space(ranges: LayerRanges | None) -> None:
    """Every component's peak weight lies in [0.8, 1.5], its floor in [0, peak], its peak position in
    the peak range of the stack (default: the last 40%) and its reach in [1, 0.6 (L-1)] layers; the
    direction index lies in its range (default [0.4, 0.9] of L - 1). Both ranges are covered end to end."""
    num_layers, last = 24, 23
    expected = ranges or LayerRanges((0.4, 0.9), (0.6, 1.0))  # the defaults
    (index_low, index_high), (peak_low, peak_high) = expected.direction_index, expected.peak_position
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), directions=["minimize", "minimize"])
    indices, peaks = [], []
    for _ in range(200):
        trial = study.ask()
        parameters = suggest_parameters(trial, num_layers, ["attn", "mlp"], ranges=ranges)
        assert index_low * last <= parameters.direction_index <= index_high * last
        indices.append(parameters.direction_index / last)
        for kernel in parameters.kernels.values():
            assert 0.8 <= kernel.max_weight <= 1.5
            assert 0.0 <= kernel.min_weight <= kernel.max_weight
            assert peak_low * last <= kernel.max_weight_position <= last * peak_high
            assert 1.0 <= kernel.min_weight_distance <= 0.6 * last
            peaks.append(kernel.max_weight_position / last)
        study.tell(trial, [0.0, 0.0])
    # 200 uniform draws reach within 5% of each end of their range.
    assert min(indices) < index_low + 0.05 and max(indices) > index_high - 0.05
    assert min(peaks) < peak_low + 0.05 and max(peaks) > peak_high - 0.05


def test_layer_ranges_of_settings_are_the_options_given() -> None:
    """A replayed trial samples in the ranges of the settings it is given; no option gives the defaults."""
    settings = settings_from_argv(["--direction-index-range", "[0.4, 1]", "--peak-position-range", "[0.3, 1]"])
    assert LayerRanges.of_settings(settings) == LayerRanges((0.4, 1.0), (0.3, 1.0))
    assert LayerRanges.of_settings(settings_from_argv([])) == LayerRanges.default() == LayerRanges((0.4, 0.9), (0.6, 1.0))


@pytest.mark.parametrize("mode", ["none", "pre", "full"])
def test_adapters_reproduce_the_explicit_subspace_ablation(mode: str) -> None:
    """With a k = 2 subspace per layer, M + BA = M - w V^T V M (row-normalized variants alike)."""
    model = make_model("llama")
    arch = build_architecture_map(model)
    originals = {
        t.name: as_matrices(getattr(model.get_submodule(t.module), t.parameter), t).clone() for _, _, t in arch.targets()
    }
    generator = torch.Generator().manual_seed(0)
    bases = torch.stack([orthonormal_rows(torch.randn(2, 64, generator=generator)) for _ in range(arch.num_layers + 1)])
    parameters = AblationParameters("per-layer", 0.0, {"attn": ComponentKernel(1.0, 2.0, 0.5, 2.0)})
    ablator = Ablator(model, arch, mode, rank=64, seed=0, subspace_rank=2)
    ablator.subspace = bases
    merged = ablator.merged_state_dict(parameters, bases[:, 0])
    for layer, component, target in arch.targets():
        weight = parameters.weight(component, layer)
        original = originals[target.name]
        expected = ablated_matrices(original, bases[layer + 1], weight, mode) if weight else original
        torch.testing.assert_close(as_matrices(merged[target.name], target), expected, atol=1e-4, rtol=1e-4)


def test_positions_kl_tokens_and_ranges_run_end_to_end(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"
    extra = ["--n-trials", "2", "--kl-tokens", "3", "--direction-positions", "[-3, -1]"]
    ranges = ["--direction-index-range", "[0.95, 1.0]", "--peak-position-range", "[0.0, 0.05]"]
    run(heretic_command(tiny_models["llama"], checkpoints, *extra, *ranges), tmp_path)
    trials = current_study(checkpoints).trials
    assert len(trials) == 2 and all(t.values is not None and t.values[1] >= 0 for t in trials)
    last = 3  # the tiny model's four layers
    assert all(t.params["direction_index"] >= 0.95 * last and t.params["attn.max_weight_position"] <= 0.05 * last for t in trials)


def test_an_interrupt_during_the_study_writes_waits_for_them() -> None:
    """Ctrl+C or SIGTERM inside signals_deferred lets the block finish, then raises KeyboardInterrupt; the
    handlers are restored."""
    import time

    from heretic.search.runner import signals_deferred

    def terminate(signum: int, frame: object) -> None:  # as the command line's SIGTERM handler does
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminate)
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)  # as Python sets it unless started ignoring it
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            finished = False
            with pytest.raises(KeyboardInterrupt), signals_deferred():
                os.kill(os.getpid(), signum)
                time.sleep(0.05)  # the signal is delivered here, and held
                finished = True
            assert finished
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
            assert signal.getsignal(signal.SIGTERM) is terminate
        with signals_deferred():  # nothing received: nothing raised
            pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


def test_a_signal_the_process_ignores_stays_ignored_in_the_study_writes() -> None:
    """Started with SIGINT ignored (`nohup`, a script's background job), a Ctrl+C inside signals_deferred
    neither interrupts the run afterwards nor changes the disposition."""
    import time

    from heretic.search.runner import signals_deferred

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_out_of_memory_in_a_trial_halves_the_batch_and_the_search_goes_on(
    tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trial that runs out of memory (its batches of the longest prompts, here any batch over 2 once a
    trial's ablation is applied) is scored again in smaller batches; every trial completes."""
    from heretic.cli import run as run_in_process
    from heretic.model import device
    from heretic.model.generation import Engine

    generate = Engine.generate
    in_trial = [False]

    def tight_generate(self: Engine, ids: list[list[int]], *args: object, **kwargs: object) -> object:
        if in_trial[0] and min(len(ids), int(kwargs.get("batch_size") or self.batch_size)) > 2:  # type: ignore[call-overload]
            raise device.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")
        return generate(self, ids, *args, **kwargs)  # type: ignore[arg-type]

    apply = Ablator.apply

    def trial_apply(self: Ablator, *args: object) -> None:
        in_trial[0] = True
        apply(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(Engine, "generate", tight_generate)
    monkeypatch.setattr(Ablator, "apply", trial_apply)
    checkpoints = tmp_path / "checkpoints"
    argv = heretic_command(tiny_models["llama"], checkpoints, "--batch-size", "8", "--n-trials", "3")[3:]
    run_in_process(settings_from_argv(argv))
    trials = current_study(checkpoints).trials
    assert len(trials) == 3 and all(t.state == TrialState.COMPLETE for t in trials)
