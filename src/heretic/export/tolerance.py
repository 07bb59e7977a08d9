"""Whether rebuilt weights equal recorded ones within the rounding that another CPU, BLAS or GPU introduces.

A rebuild on the recording machine is bit-identical (the kernels round each element by itself); on another
machine the float32 reductions behind the directions and factors (means over prompts, v^T M) are summed
in another order and end a few units in the last place (ulps) apart, and a weight saved in bfloat16 can then
round to the neighbouring value. A genuine difference (another trial, direction or model) moves most changed
elements by far more.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

# The most elements compared at once (in float64: 32 MiB per temporary).
PIECE_ELEMENTS = 1 << 22


def ulp(values: Tensor, dtype: torch.dtype) -> Tensor:
    """The spacing of `dtype`'s numbers at |x|: 2^floor(log2 |x|) * eps (eps = finfo(dtype).eps), and the
    subnormal spacing tiny * eps below the smallest normal number. Computed in float64."""
    info = torch.finfo(dtype)
    magnitude = values.double().abs().clamp_min(info.tiny)
    return torch.exp2(torch.floor(torch.log2(magnitude))) * info.eps


def allowed_difference(recorded: Tensor, rebuilt: Tensor, saved: torch.dtype, rms: float) -> Tensor:
    """The largest difference accepted for each element:

        |a - b| <= 2 ulp_saved(max(|a|, |b|)) + 2^-13 rms(T)

    Two ulps of the saved dtype cover a value rounded to either neighbour. The second term (0.012 % of the
    tensor's root mean square) covers what the rebuild computes differently: the directions, read from
    forward passes, differ by about 1e-5 between CPUs in float32, and products in bfloat16 by 2^-8 of the
    ablation's change, itself a few % of the weights. A kernel weight 1 % apart moves the changed
    elements by more (see the tests)."""
    magnitude = torch.maximum(recorded.double().abs(), rebuilt.double().abs())
    return 2 * ulp(magnitude, saved) + RMS_SHARE * rms


# The share of a tensor's root mean square that a rebuild on another machine may differ by (see above).
RMS_SHARE = 2.0**-13


@dataclass(frozen=True)
class Difference:
    """How far a rebuilt tensor (or file) lies from the recorded one."""

    name: str
    largest: float  # max |a - b|
    worst_ratio: float  # max |a - b| / allowed: <= 1 within tolerance
    changed: int  # elements that differ at all
    total: int
    problem: str | None = None  # a difference no tolerance covers (shape, dtype, a missing tensor)

    @property
    def within(self) -> bool:
        return self.problem is None and self.worst_ratio <= 1.0

    def describe(self) -> str:
        if self.problem is not None:
            return f"{self.name}: {self.problem}"
        return (
            f"{self.name}: largest difference {self.largest:.3g} ({self.worst_ratio:.2g} of the tolerance), "
            f"{self.changed:,} of {self.total:,} values differ"
        )


def compare_tensors(name: str, recorded: Tensor, rebuilt: Tensor) -> Difference:
    """Compare two tensors element by element, in pieces of rows (float64 temporaries stay bounded)."""
    if recorded.shape != rebuilt.shape or recorded.dtype != rebuilt.dtype:
        problem = f"recorded {recorded.dtype} {tuple(recorded.shape)}, rebuilt {rebuilt.dtype} {tuple(rebuilt.shape)}"
        return Difference(name, float("inf"), float("inf"), recorded.numel(), recorded.numel(), problem)
    if not recorded.is_floating_point():
        changed = int((recorded != rebuilt).sum())
        if changed:
            return Difference(name, float("inf"), float("inf"), changed, recorded.numel(), f"{changed:,} integer values differ")
        return Difference(name, 0.0, 0.0, 0, recorded.numel())
    flat_a, flat_b = recorded.reshape(-1), rebuilt.reshape(-1)
    pieces = [slice(start, start + PIECE_ELEMENTS) for start in range(0, flat_a.numel(), PIECE_ELEMENTS)]
    squares = sum(float(flat_a[piece].double().square().sum()) for piece in pieces)
    rms = (squares / max(1, flat_a.numel())) ** 0.5
    largest = worst = 0.0
    changed = 0
    for piece in pieces:
        a, b = flat_a[piece], flat_b[piece]
        gap = (a.double() - b.double()).abs()
        if gap.isnan().any() or a.isnan().ne(b.isnan()).any():
            return Difference(name, float("nan"), float("inf"), recorded.numel(), recorded.numel(), "NaN in one of them")
        largest = max(largest, float(gap.max())) if gap.numel() else largest
        worst = max(worst, float((gap / allowed_difference(a, b, recorded.dtype, rms)).max())) if gap.numel() else worst
        changed += int((gap > 0).sum())
    return Difference(name, largest, worst, changed, recorded.numel())


def compare_files(recorded: Path, rebuilt: Path) -> Difference:
    """The worst tensor of two safetensors files, read one tensor at a time (memory: one tensor of each)."""
    from safetensors import safe_open

    try:
        first, second = safe_open(str(recorded), "pt"), safe_open(str(rebuilt), "pt")
    except Exception as error:  # noqa: BLE001 - not a safetensors file (a .bin or .gguf): compared by hash only
        return Difference(rebuilt.name, float("inf"), float("inf"), 0, 0, f"cannot be read as safetensors ({error})")
    with first as a, second as b:
        names_a, names_b = set(a.keys()), set(b.keys())
        if names_a != names_b:
            missing = sorted(names_a ^ names_b)[0]
            where = "rebuilt" if missing in names_a else "recorded"
            return Difference(
                rebuilt.name, float("inf"), float("inf"), 0, 0, f"the tensor {missing} is missing in the {where} file"
            )
        worst: Difference | None = None
        changed = total = 0
        for name in sorted(names_a):
            difference = compare_tensors(name, a.get_tensor(name), b.get_tensor(name))
            changed, total = changed + difference.changed, total + difference.total
            if not difference.within:
                return replace(difference, name=f"{rebuilt.name} ({name})")
            if worst is None or difference.worst_ratio > worst.worst_ratio:
                worst = difference
    if worst is None:
        return Difference(rebuilt.name, 0.0, 0.0, 0, 0)
    return Difference(f"{rebuilt.name} ({worst.name})", worst.largest, worst.worst_ratio, changed, total)
