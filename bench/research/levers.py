"""What each exact speed-up buys: the work of one trial timed with one lever switched off at a time.

A trial's cost is counting refusals (greedy responses to the harmful evaluation prompts) plus one
forward pass over the harmless ones for KL. This script runs exactly that on the benchmark model
and prompts (see run_bench.py) with every speed-up on, then with each exact one off, checks that
the verdicts stay identical, and times the automatic batch-size choice. The one inexact lever,
cutting hopeless trials short, is measured from the search itself (bench/results/latest.json).

    python -m bench.research.levers                       # after run_bench.py has prepared the model
    python -m bench.research.levers --eval-prompts 40     # quicker
    python -m bench.research.levers --report-only         # after a new benchmark run: refresh the cut-trial row
                                                 # (and the compile row, after bench/research/compile_lever.py)

Writes bench/results/levers.json and the "levers" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.harness.machine import machine, run_record
from bench.harness.paths import DEFAULT_DATASETS, RESEARCH, RESULTS, WORK
from bench.harness.publish import update_section
from bench.harness.tools import REFERENCE_VENV, reference_default_markers
from heretic.config import Settings
from heretic.model.batching import choose_batch_size
from heretic.model.generation import Engine
from heretic.model.loading import eos_token_ids
from heretic.prompts import load_prompts
from heretic.scoring.evaluator import Evaluator
from heretic.scoring.refusals import MarkerJudge
from heretic.session import load


def timed_trial_work(engine: Engine, evaluator: Evaluator) -> tuple[float, list[bool]]:
    """Seconds for one trial's scoring (refusals + KL), and the refusal verdicts."""
    started = time.perf_counter()
    counted = evaluator.count_refusals()
    evaluator.logprobs()
    return time.perf_counter() - started, counted.verdicts


def cut_trials_gain(latest: Path) -> dict[str, Any] | None:
    """Median duration of cut and of fully scored trials in our benchmark search."""
    if not latest.exists():
        return None
    ours = json.loads(latest.read_text())["tools"].get("ours")
    if not ours:
        return None
    cut = [t["seconds"] for t in ours["trials"] if t["cut"]]
    full = [t["seconds"] for t in ours["trials"] if not t["cut"]]
    if not cut or not full:
        return {"cut_trials": len(cut), "trials": len(cut) + len(full)}
    return {
        "cut_trials": len(cut),
        "trials": len(cut) + len(full),
        "median_cut_s": statistics.median(cut),
        "median_full_s": statistics.median(full),
        "total_s": sum(cut) + sum(full),
        "total_if_uncut_s": statistics.median(full) * len(cut) + sum(full),
    }


def compile_lever(path: Path) -> dict[str, Any] | None:
    """The static-cache / torch.compile measurement of bench/research/compile_lever.py, where it has run."""
    return json.loads(path.read_text()) if path.exists() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval-prompts", type=int, default=100)
    parser.add_argument("--max-response-length", type=int, default=100)
    parser.add_argument("--max-batch-size", type=int, default=128)
    parser.add_argument("--datasets", type=Path, default=DEFAULT_DATASETS)
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="measure nothing: rewrite the section from bench/results/levers.json, "
        "with the cut-trial row from the latest benchmark run",
    )
    args = parser.parse_args()
    if args.report_only:
        results = json.loads((RESULTS / "levers.json").read_text())
        results["cut_hopeless_trials"] = cut_trials_gain(RESULTS / "latest.json")
        results["compile"] = compile_lever(RESULTS / "compile-lever.json")
        publish(results)
        return

    torch.manual_seed(0)
    model_dir = WORK / "Qwen2.5-Coder-0.5B-Instruct"
    if not (model_dir / "config.json").is_file():
        sys.exit("Run bench/run_bench.py first: it prepares the benchmark model in bench/work/.")
    settings = Settings.model_validate(
        {
            "model": str(model_dir),
            "dtypes": ["bfloat16"],
            "harmful_eval_prompts": f"{args.datasets / 'harmful_test.txt'}[:{args.eval_prompts}]",
            "harmless_eval_prompts": f"{args.datasets / 'harmless_test.txt'}[:{args.eval_prompts}]",
        }
    )
    loaded = load(settings)
    harmful = load_prompts(settings.harmful_eval_prompts, settings.system_prompt)
    harmless = load_prompts(settings.harmless_eval_prompts, settings.system_prompt)
    reference_python = REFERENCE_VENV / "bin" / "python"
    markers = reference_default_markers(reference_python) if reference_python.exists() else settings.refusal_markers
    judge = MarkerJudge(markers)
    engine = Engine(loaded.model, loaded.tokenizer, eos_token_ids(loaded))

    started = time.perf_counter()
    batch_size, measurements = choose_batch_size(engine, args.max_batch_size)
    choice_s = time.perf_counter() - started
    engine.batch_size = batch_size
    print(
        f"batch size {batch_size} chosen in {choice_s:.1f} s: "
        + ", ".join(f"{m.batch_size}: {m.tokens_per_second or 0:.0f} tok/s" for m in measurements)
    )

    def evaluator(stop_on_verdict: bool = True, prompts: list | None = None) -> Evaluator:
        return Evaluator(
            engine, judge, prompts or harmful, harmless if prompts is None else prompts, args.max_response_length, stop_on_verdict
        )

    timed_trial_work(engine, evaluator())  # warm-up
    rows: list[dict[str, Any]] = []

    def measure(name: str, what: str, make: Any, restore: Any, subset: int | None = None, batch: int | None = None) -> None:
        prompts = harmful[:subset] if subset else None
        engine.batch_size = batch or batch_size
        on_s, on_verdicts = timed_trial_work(engine, evaluator(prompts=prompts))
        make()
        try:
            off_s, off_verdicts = timed_trial_work(engine, evaluator(stop_on_verdict=name != "stop on verdict", prompts=prompts))
        finally:
            restore()
            engine.batch_size = batch_size
        rows.append(
            {
                "lever": name,
                "what": what,
                "prompts": subset or len(harmful),
                "on_s": round(on_s, 2),
                "off_s": round(off_s, 2),
                "gain": round(off_s / on_s, 2),
                "refusals_on": sum(on_verdicts),
                "refusals_off": sum(off_verdicts),
                "differing_verdicts": sum(a != b for a, b in zip(on_verdicts, off_verdicts)),
            }
        )
        print(rows[-1])

    measure("stop on verdict", "a response stops once a refusal marker is seen (exact)", lambda: None, lambda: None)
    measure(
        "shared prompt prefix",
        "the chat-template prefix is computed once per batch",
        lambda: setattr(engine, "share_prefix", False),
        lambda: setattr(engine, "share_prefix", True),
    )
    measure(
        "length-ordered batches",
        "prompts batched by length, not in file order (batch size 16, so there are several batches)",
        lambda: setattr(engine, "length_order", False),
        lambda: setattr(engine, "length_order", True),
        batch=16,
    )
    measure(
        "batching",
        f"batch size {batch_size} (chosen) instead of 1",
        lambda: setattr(engine, "batch_size", 1),
        lambda: None,
        subset=16,
    )
    head = loaded.model.get_output_embeddings()
    hook = head._heretic_contiguous

    def unhook() -> None:
        hook.remove()

    def rehook() -> None:
        head._heretic_contiguous = False
        from heretic.model.generation import make_head_input_contiguous

        make_head_input_contiguous(loaded.model)

    # bf16 -> float32 -> bf16 is lossless, so the model is the same before and after this lever
    measure(
        "bf16",
        "weights and activations in bfloat16 instead of float32 (where the CPU has fast bf16 matrix units)",
        lambda: loaded.model.to(torch.float32),
        lambda: loaded.model.to(torch.bfloat16),
        subset=32,
    )
    measure(
        "contiguous output-head input",
        "the output head gets a contiguous input (a guard against a slow strided bf16 GEMM path of some PyTorch CPU builds; no effect in this set-up)",
        unhook,
        rehook,
        subset=8,
    )

    results = {
        "date": dt.date.today().isoformat(),
        "machine": machine(),
        "command": "python -m bench.research.levers " + shlex.join(sys.argv[1:]),
        "eval_prompts": len(harmful),
        "max_response_length": args.max_response_length,
        "batch_choice": {
            "batch_size": batch_size,
            "seconds": round(choice_s, 1),
            "tokens_per_second": {m.batch_size: m.tokens_per_second for m in measurements},
        },
        "levers": rows,
        "cut_hopeless_trials": cut_trials_gain(RESULTS / "latest.json"),
        "compile": compile_lever(RESULTS / "compile-lever.json"),
    }
    publish(results)


def publish(results: dict[str, Any]) -> None:
    """bench/results/levers.json and the "levers" section of BENCHMARKS.md."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "levers.json").write_text(json.dumps(results, indent=2))
    update_section(report(results), "levers", run_record(), results["command"], RESEARCH / "2026-11-29-levers.md")


def report(results: dict[str, Any]) -> str:
    """The "levers" section of BENCHMARKS.md."""
    choice = results["batch_choice"]
    lines = [
        "### Levers: what each speed-up buys",
        "",
        f"- {results['date']}, {results['machine']}; command: `{results['command']}`",
        f"- the work of one trial (refusals on {results['eval_prompts']} harmful prompts at {results['max_response_length']} tokens + KL on "
        f"{results['eval_prompts']} harmless prompts) on the benchmark model, bf16, timed with every speed-up on and then with one off; "
        "fewer prompts where the slow variant would take too long",
        f"- automatic batch-size choice: batch size {choice['batch_size']} in {choice['seconds']:.1f} s "
        f"({', '.join(f'{size}: {rate or 0:.0f}' for size, rate in choice['tokens_per_second'].items())} tokens/s)",
        "- the search levers (the sampler's KL floor, the MLP weight range, univariate TPE, TPE's candidates per trial) "
        "change which trials are run rather than their cost; their effect on the fronts of the same seeds is in "
        '"About the run above"',
        "",
        "| lever | what it does | prompts | on (s) | off (s) | gain | refusals on / off | verdicts that differ |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["levers"]:
        lines.append(
            f"| {row['lever']} | {row['what']} | {row['prompts']} | {row['on_s']:.1f} | {row['off_s']:.1f} | {row['gain']:.2f}× | "
            f"{row['refusals_on']} / {row['refusals_off']} | {row['differing_verdicts']} |"
        )
    cut = results["cut_hopeless_trials"]
    if cut and "median_cut_s" in cut:
        lines.append(
            f"| cut hopeless trials | stop counting refusals once a trial is dominated (inexact: refusals recorded as a lower bound, marked cut) | "
            f"{cut['cut_trials']} of {cut['trials']} trials | {cut['total_s']:.0f} (search total) | {cut['total_if_uncut_s']:.0f} (estimate: cut trials at the median full trial) | "
            f"{cut['total_if_uncut_s'] / cut['total_s']:.2f}× | n/a | n/a (front from exact trials only) |"
        )
    compiled = results.get("compile")
    if compiled:
        variants = compiled["variants"]
        on, off = variants["static cache, torch.compile"], variants["dynamic cache, eager"]
        lines.append(
            f"| static KV cache + torch.compile | transformers' generate with a preallocated cache and the decoding step compiled by "
            f"inductor, against a dynamic cache run eagerly; one batch of {compiled['prompts']}, all {compiled['tokens']} tokens "
            f"forced (`{compiled['command']}`) | {compiled['prompts']} | {on['seconds']:.1f} | {off['seconds']:.1f} | "
            f"{off['seconds'] / on['seconds']:.2f}× | n/a | {on['differing_responses']} of {compiled['prompts']} responses (token level) |"
        )
    lines += [
        "",
        "The exact levers compute the same function in exact arithmetic (tests in float32 show identical responses). "
        "In bf16 a different batch composition or a separately computed prefix changes rounding, which can flip a greedy "
        "continuation at a near-tie; the last column counts such flips against the all-on run.",
    ]
    if compiled:
        lines += [
            "",
            f"Static KV cache and torch.compile do not pay on this CPU (torch {compiled['torch']}): decoding with the compiled step is "
            f"{on['seconds'] / off['seconds']:.1f}× slower than eager decoding, its first call (compiling) takes "
            f"{on['first_call_s']:.0f} s, and a static cache alone takes {variants['static cache, eager']['seconds']:.1f} s against "
            f"{off['seconds']:.1f} s. A fixed-shape step also cannot drop finished rows from the "
            f"batch: our engine, as a trial runs it (rows leave at end of text or once their verdict is fixed), generates "
            f"for the same prompts in {compiled['our_engine_trial_generation_s']:.1f} s. So neither is used.",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
