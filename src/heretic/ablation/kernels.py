"""The math of parametrized directional ablation (pure tensor functions, no model, no I/O).

A matrix M (out x in, out = hidden size) writes into the residual stream; v is a unit direction
there. Ablation with weight w: M' = M - w v (v^T M), stored as a low-rank update B A
(B: out x r, A: r x in) on top of the frozen M. Matrices come batched as (experts, out, in).
A subspace with orthonormal basis V (k x out, rows v_1..v_k) generalizes v v^T to the projector
V^T V: M' = M - w V^T (V M), of rank k; k = 1 is the single-direction case, computed by the same code.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from ..directions import orthonormal_rows


def kernel_weight(
    layer: float, max_weight: float, max_weight_position: float, min_weight: float, min_weight_distance: float
) -> float:
    """Ablation weight of a layer: W at the peak P, linear to Wmin at distance D, zero beyond D."""
    distance = abs(layer - max_weight_position)
    if distance > min_weight_distance:
        return 0.0
    if min_weight_distance <= 0:
        return max_weight
    return max_weight + (distance / min_weight_distance) * (min_weight - max_weight)


def interpolate_direction(directions: Tensor, index: float) -> Tensor:
    """normalize((1-f) r_k + f r_{k+1}) with k = floor(index), f = index - k. directions: (positions, hidden)."""
    last = directions.shape[0] - 1
    index = min(max(index, 0.0), float(last))
    k = min(int(math.floor(index)), last - 1) if last > 0 else 0
    f = index - k
    mixed = (1.0 - f) * directions[k] + (f * directions[k + 1] if last > 0 else 0.0)
    unit: Tensor = mixed / mixed.norm().clamp_min(1e-12)
    return unit


def interpolate_subspace(bases: Tensor, index: float) -> Tensor:
    """Orthonormalized row-wise interpolation of bases (positions, k, hidden) at a fractional index:
    orthonormal_rows((1-f) V_k + f V_{k+1}) with k = floor(index), f = index - k. (k, hidden)."""
    rows = [interpolate_direction(bases[:, i, :], index) for i in range(bases.shape[1])]
    return orthonormal_rows(torch.stack(rows))


def through_norm(direction: Tensor, scale: Tensor) -> Tensor:
    """The direction u to ablate in a matrix whose output y passes through an RMS norm g * y / rms(y) before
    it reaches the residual stream: r . (g * y / rms(y)) = (g * r) . y / rms(y), so u = (g * r) / |g * r|
    removes the write along r. direction: r (hidden,) or an orthonormal basis (k, hidden), then the basis
    of the scaled rows; scale: g (hidden,)."""
    g = scale.to(direction)
    if direction.dim() == 1:
        scaled: Tensor = g * direction
        unit: Tensor = scaled / scaled.norm().clamp_min(1e-12)
        return unit
    return orthonormal_rows(direction * g)  # (k, hidden)


def projection(matrices: Tensor, direction: Tensor) -> Tensor:
    """v v^T M for a direction v (out,), V^T V M for an orthonormal basis V (k, out). matrices: (experts, out, in)."""
    v = direction.to(matrices)
    if v.dim() == 1:
        return torch.einsum("o,ei->eoi", v, torch.einsum("o,eoi->ei", v, matrices))
    return torch.einsum("ko,eki->eoi", v, torch.einsum("ko,eoi->eki", v, matrices))


def row_norms(matrices: Tensor) -> Tensor:
    """Norms of the rows (one per output dimension): (experts, out)."""
    norms: Tensor = matrices.norm(dim=-1)
    return norms


def ablated_matrices(matrices: Tensor, direction: Tensor, weight: float, mode: str) -> Tensor:
    """The explicitly ablated matrices (reference implementation; float32).

    none: M - w V^T V M   (V: (k, out) orthonormal rows; k = 1: M - w v v^T M)
    pre:  diag(n) (M^ - w V^T V M^), M^ = diag(1/n) M   (ablation of the row-normalized matrix)
    full: diag(n / n') (M^ - w V^T V M^), n' = row norms of the ablated M^   (every row keeps its norm)
    direction: (out,) or (k, out).
    """
    if mode == "none":
        return matrices - weight * projection(matrices, direction)
    norms = row_norms(matrices).clamp_min(1e-12).unsqueeze(-1)  # (experts, out, 1)
    unit = matrices / norms
    ablated = unit - weight * projection(unit, direction)
    if mode == "pre":
        return ablated * norms
    if mode == "full":
        kept: Tensor = ablated * (norms / ablated.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        return kept
    raise ValueError(f"unknown row normalization {mode!r}")


class Factors(NamedTuple):
    """An ablated matrix stored on top of the frozen M: M' = diag(s) (M + B A), or M + B A without a scale.

    b: (experts, out, r), a: (experts, r, in), scale: (experts, out) or None."""

    b: Tensor
    a: Tensor
    scale: Tensor | None = None

    def merged(self, matrices: Tensor) -> Tensor:
        """M' = diag(s) (M + B A) for matrices M (experts, out, in), B A summed rank by rank (`low_rank_sum`)."""
        updated = low_rank_sum(matrices, self.b, self.a)
        return updated if self.scale is None else updated * self.scale.unsqueeze(-1)


def low_rank_sum(matrices: Tensor, b: Tensor, a: Tensor) -> Tensor:
    """M + B A = M + sum_j b_j a_j^T, one outer product at a time, in B's and A's dtype promoted with M's.

    matrices (experts, out, in), b (experts, out, r), a (experts, r, in). Only elementwise products and sums
    in a fixed order: each element is correctly rounded whatever the CPU, BLAS kernel, memory alignment or
    number of rows, where a matrix product's rounding depends on all four (r is small: 1 to a dozen).
    """
    total = matrices.to(torch.promote_types(matrices.dtype, b.dtype))
    for j in range(b.shape[-1]):
        total = total + b[:, :, j : j + 1] * a[:, j : j + 1, :]  # b_j a_j^T: (experts, out, in)
    return total


def norm_preserving_factors(matrices: Tensor, direction: Tensor, weight: float) -> Factors:
    """Exact factors of the norm-preserving (full) ablation: M' = diag(s) (M + B A).

    With n the row norms of M and M^ = diag(1/n) M, the pre factors B = -w diag(n) V^T, A = V M^ give
    M + B A = diag(n) (M^ - w V^T V M^); its rows scaled by s = n / (row norms of M + B A) are
    diag(n / n') (M^ - w V^T V M^), the full ablation, with every row of M's norm. The scale is
    computed in `wide_dtype` (float64 on the CPU, where reductions in float32 change in the last bits with
    memory alignment), in pieces
    of rows; each row's scale is computed by the same elementwise operations and one reduction along that
    row whatever the piece (`low_rank_sum`), so the pieces change no bit.
    direction: (out,) or (k, out); B (experts, out, k), A (experts, k, in), s (experts, out).
    """
    b, a = ablation_factors(matrices, direction, weight, "pre")
    precision = wide_dtype(matrices.device)
    scale = torch.empty(matrices.shape[:2], dtype=precision, device=matrices.device)  # (experts, out)
    a_wide = a.to(precision)
    for rows in chunks(matrices.shape[1], matrices.shape[0] * matrices.shape[2]):  # float64 in bounded pieces
        wide = matrices[:, rows].to(precision)
        updated = low_rank_sum(wide, b[:, rows].to(precision), a_wide)  # M + B A: (experts, rows, in)
        scale[:, rows] = row_norms(wide) / row_norms(updated).clamp_min(1e-12)
    return Factors(b, a, scale.to(matrices.dtype))


def wide_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the kernels' sensitive arithmetic (norms, scales, the randomized SVD) on `device`:
    float64 on the CPU, so that a rebuild does not depend on memory alignment (float32 CPU reductions
    do); float32 elsewhere: MPS has no float64, and consumer GPUs run it at 1/32 to 1/64 of float32's speed."""
    return torch.float64 if device.type == "cpu" else torch.float32


# The most float64 elements a kernel holds at once per temporary (64 MiB): a large model's matrix
# (e.g. 4096 x 14336) is processed in pieces of rows, with the same result bit for bit (each row's
# arithmetic does not depend on the piece it is in).
CHUNK_ELEMENTS = 1 << 23


def chunks(length: int, elements_per_item: int, limit: int | None = None) -> list[slice]:
    """Consecutive slices of range(length), each of at most max(1, limit // elements_per_item) items."""
    size = max(1, (CHUNK_ELEMENTS if limit is None else limit) // max(1, elements_per_item))
    return [slice(start, min(start + size, length)) for start in range(0, length, size)]


def ablation_factors(
    matrices: Tensor, direction: Tensor, weight: float, mode: str, rank: int = 3, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Low-rank factors (B: experts x out x r, A: experts x r x in) with M + B A = the ablated matrix.

    Exact (r = 1) for none and pre; for full the difference is not rank-1 and B A is its best rank-r
    approximation (randomized SVD, deterministic for a given seed). A basis (k, out) gives exact rank-k
    factors for none and pre: B = -w V^T (times diag(n) for pre), A = V M (V M^ for pre).
    """
    if direction.dim() == 2 and mode in ("none", "pre"):
        v = direction.to(matrices)  # (k, out)
        unit = matrices if mode == "none" else matrices / row_norms(matrices).clamp_min(1e-12).unsqueeze(-1)
        a = torch.einsum("ko,eoi->eki", v, unit)  # V M (or V M^): (experts, k, in)
        scale = torch.ones_like(unit[:, :, 0]) if mode == "none" else row_norms(matrices).clamp_min(1e-12)  # (experts, out)
        b = -weight * torch.einsum("ko,eo->eok", v, scale)  # -w diag(n) V^T: (experts, out, k)
        return b.contiguous(), a
    v = direction.to(matrices)
    if mode == "none":
        a = torch.einsum("o,eoi->ei", v, matrices).unsqueeze(1)  # v^T M: (experts, 1, in)
        b = (-weight * v).expand(matrices.shape[0], -1).unsqueeze(-1)  # -w v: (experts, out, 1)
        return b.contiguous(), a
    if mode == "pre":
        norms = row_norms(matrices).clamp_min(1e-12)  # (experts, out)
        a = torch.einsum("o,eoi->ei", v, matrices / norms.unsqueeze(-1)).unsqueeze(1)  # v^T M^
        b = (-weight * v * norms).unsqueeze(-1)  # -w (n * v)
        return b, a
    if mode == "full":
        # One expert at a time, always: a batched product, QR or SVD may round an expert differently from
        # the same expert alone (MKL on Intel CPUs does), and an adapter rebuilt from its record must not
        # depend on how many experts a piece holds.
        probe = sketch(matrices.shape, rank, seed, matrices.dtype)
        parts = [
            low_rank_approximation(ablated_matrices(piece, direction, weight, "full") - piece, rank, probe=probe[e : e + 1])
            for e in range(matrices.shape[0])
            for piece in (matrices[e : e + 1],)
        ]
        return torch.cat([b for b, _ in parts]), torch.cat([a for _, a in parts])
    raise ValueError(f"unknown row normalization {mode!r}")


def sketch(shape: torch.Size | tuple[int, ...], rank: int, seed: int, dtype: torch.dtype, oversample: int = 8) -> Tensor:
    """The random test matrices of a randomized SVD of a batch of (m, n) matrices: (batch, n, width),
    width = min(rank + oversample, m, n), drawn on the CPU from `seed` (the same on every device)."""
    batch, rows, cols = shape
    width = min(min(rank, rows, cols) + oversample, rows, cols)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn((batch, cols, width), generator=generator, dtype=dtype)


def low_rank_approximation(
    matrices: Tensor, rank: int, seed: int = 0, iterations: int = 4, probe: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Rank-r factors (B, A) of a batch of matrices by randomized SVD with power iterations.

    matrices: (batch, m, n). Returns B (batch, m, r) = U sqrt(S), A (batch, r, n) = sqrt(S) V^T.
    probe: the sketch's test matrices (batch, n, width), by default `sketch(matrices.shape, rank, seed)`.

    Computed in `wide_dtype` (float64 on the CPU) and returned in the input's dtype: in float32, CPU BLAS
    results change in the last bits with the memory alignment of the inputs, and an adapter rebuilt from
    its record must be bit-identical; float64 rounded to float32 is.
    """
    dtype = matrices.dtype
    if probe is None:
        probe = sketch(matrices.shape, rank, seed, dtype)
    matrices = matrices.to(wide_dtype(matrices.device))
    rank = min(rank, *matrices.shape[1:])
    probe = probe.to(matrices)
    basis, _ = torch.linalg.qr(matrices @ probe)  # range finder: (batch, m, width)
    for _ in range(iterations):  # power iterations sharpen the spectrum
        basis, _ = torch.linalg.qr(matrices.transpose(1, 2) @ basis)
        basis, _ = torch.linalg.qr(matrices @ basis)
    small = basis.transpose(1, 2) @ matrices  # (batch, width, n)
    u, s, vh = torch.linalg.svd(small, full_matrices=False)
    root = s[:, :rank].sqrt()
    b = (basis @ u[:, :, :rank]) * root.unsqueeze(1)
    a = root.unsqueeze(-1) * vh[:, :rank, :]
    return b.to(dtype), a.to(dtype)
