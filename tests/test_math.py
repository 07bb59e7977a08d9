"""The pure math: directions, kernels, interpolation, ablation factors, KL, Pareto front."""

from __future__ import annotations

import math

import pytest
import torch

from heretic.ablation import kernels
from heretic.ablation.kernels import (
    Factors,
    ablated_matrices,
    ablation_factors,
    chunks,
    interpolate_direction,
    interpolate_subspace,
    kernel_weight,
    low_rank_approximation,
    norm_preserving_factors,
)
from heretic.ablation.parameters import AblationParameters, ComponentKernel
from heretic.directions import orthonormal_rows, refusal_directions, subspace_bases, winsorize
from heretic.export.tolerance import Difference, compare_tensors, ulp
from heretic.scoring.kl import kl_divergence, kl_over_tokens
from heretic.search.pareto import TrialResult, dominates, hypervolume, is_dominated, pareto_front, select
from heretic.search.runner import sampler_values


def unit(vector: torch.Tensor) -> torch.Tensor:
    return vector / vector.norm()


@pytest.fixture
def matrices() -> torch.Tensor:
    return torch.randn(3, 16, 24, generator=torch.Generator().manual_seed(0))  # (experts, out, in)


@pytest.fixture
def direction() -> torch.Tensor:
    return unit(torch.randn(16, generator=torch.Generator().manual_seed(1)))


# --- Directions ----------------------------------------------------------------------------------


def test_difference_of_means_direction() -> None:
    harmful = torch.tensor([[[1.0, 2.0, 0.0]], [[3.0, 2.0, 0.0]]])  # mean (2, 2, 0)
    harmless = torch.tensor([[[0.0, 2.0, 0.0]], [[0.0, 2.0, 0.0]]])  # mean (0, 2, 0)
    raw = refusal_directions(harmful, harmless, orthogonalize=False)
    torch.testing.assert_close(raw, torch.tensor([[1.0, 0.0, 0.0]]))


def test_orthogonalized_direction_has_no_harmless_component() -> None:
    generator = torch.Generator().manual_seed(2)
    harmful = torch.randn(20, 5, 8, generator=generator) + 1.0
    harmless = torch.randn(30, 5, 8, generator=generator) + 0.5
    directions = refusal_directions(harmful, harmless, orthogonalize=True)
    harmless_mean = harmless.double().mean(0)
    assert directions.shape == (5, 8) and directions.dtype == torch.float32
    torch.testing.assert_close(directions.norm(dim=-1), torch.ones(5))
    cosine = (directions.double() * harmless_mean).sum(-1) / harmless_mean.norm(dim=-1)
    assert cosine.abs().max() < 1e-6


def test_winsorization_clamps_outliers_only() -> None:
    residuals = torch.ones(2, 3, 100)
    residuals[:, :, 0] = 1000.0
    clamped = winsorize(residuals, 0.9)
    assert clamped[:, :, 0].max() == 1.0 and torch.equal(clamped[:, :, 1:], residuals[:, :, 1:])
    assert winsorize(residuals, 1.0) is residuals


# --- Kernel and interpolation --------------------------------------------------------------------


def test_kernel_weight_at_peak_edge_and_outside() -> None:
    assert kernel_weight(10, 1.2, 10.0, 0.4, 4.0) == pytest.approx(1.2)  # peak
    assert kernel_weight(14, 1.2, 10.0, 0.4, 4.0) == pytest.approx(0.4)  # edge: distance D
    assert kernel_weight(6, 1.2, 10.0, 0.4, 4.0) == pytest.approx(0.4)  # symmetric
    assert kernel_weight(12, 1.2, 10.0, 0.4, 4.0) == pytest.approx(0.8)  # halfway
    assert kernel_weight(15, 1.2, 10.0, 0.4, 4.0) == 0.0  # outside
    assert kernel_weight(10.5, 1.0, 10.0, 0.0, 0.0) == 0.0 and kernel_weight(10, 1.0, 10.0, 0.0, 0.0) == 1.0


def test_interpolation_between_layers() -> None:
    directions = torch.eye(4)[:3]  # r0 = e0, r1 = e1, r2 = e2
    torch.testing.assert_close(interpolate_direction(directions, 1.0), torch.eye(4)[1])
    torch.testing.assert_close(interpolate_direction(directions, 0.5), unit(torch.tensor([1.0, 1.0, 0.0, 0.0])))
    torch.testing.assert_close(interpolate_direction(directions, 1.25), unit(torch.tensor([0.0, 0.75, 0.25, 0.0])))
    torch.testing.assert_close(interpolate_direction(directions, 2.0), torch.eye(4)[2])
    torch.testing.assert_close(interpolate_direction(directions, 9.0), torch.eye(4)[2])  # clamped


def test_parameters_choose_directions_and_weights() -> None:
    directions = torch.eye(6)  # positions 0..5 (embedding + 5 layers)
    per_layer = AblationParameters("per-layer", 0.0, {"attn": ComponentKernel(1.0, 2.0, 0.5, 2.0)})
    torch.testing.assert_close(per_layer.direction_for(directions, 3), directions[4])  # output of layer 3
    global_ = AblationParameters("global", 2.5, {})
    torch.testing.assert_close(global_.direction_for(directions, 0), unit(directions[3] + directions[4]))
    assert per_layer.weight("attn", 2) == 1.0 and per_layer.weight("mlp", 2) == 0.0
    assert AblationParameters.from_dict(per_layer.to_dict()) == per_layer


# --- Ablation ------------------------------------------------------------------------------------


def test_none_mode_is_the_explicit_orthogonalization(matrices: torch.Tensor, direction: torch.Tensor) -> None:
    b, a = ablation_factors(matrices, direction, 0.7, "none")
    assert b.shape == (3, 16, 1) and a.shape == (3, 1, 24)
    projector = torch.eye(16) - 0.7 * torch.outer(direction, direction)
    torch.testing.assert_close(matrices + b @ a, projector @ matrices, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(matrices + b @ a, ablated_matrices(matrices, direction, 0.7, "none"), atol=1e-5, rtol=1e-5)


def test_pre_mode_ablates_the_row_normalized_matrix(matrices: torch.Tensor, direction: torch.Tensor) -> None:
    b, a = ablation_factors(matrices, direction, 1.1, "pre")
    norms = matrices.norm(dim=-1, keepdim=True)
    normalized = matrices / norms
    expected = (normalized - 1.1 * torch.einsum("o,ei->eoi", direction, torch.einsum("o,eoi->ei", direction, normalized))) * norms
    torch.testing.assert_close(matrices + b @ a, expected, atol=1e-5, rtol=1e-5)


def test_full_mode_keeps_row_norms_and_approximates_the_explicit_matrix(matrices: torch.Tensor, direction: torch.Tensor) -> None:
    explicit = ablated_matrices(matrices, direction, 1.0, "full")
    torch.testing.assert_close(explicit.norm(dim=-1), matrices.norm(dim=-1), atol=1e-5, rtol=1e-5)
    b, a = ablation_factors(matrices, direction, 1.0, "full", rank=3, seed=7)
    approximated = matrices + b @ a
    # The difference is not rank-1; rank 3 captures nearly all of it.
    error = (approximated - explicit).norm() / (explicit - matrices).norm()
    assert error < 0.35

    # Row norms stay within tolerance, far closer than without norm preservation.
    def drift(result: torch.Tensor) -> float:
        return float(((result.norm(dim=-1) - matrices.norm(dim=-1)).abs() / matrices.norm(dim=-1)).max())

    assert drift(approximated) < 0.1
    assert drift(approximated) < drift(ablated_matrices(matrices, direction, 1.0, "none")) / 2
    # Full rank reproduces it exactly, and a seed fixes the randomized SVD.
    b_full, a_full = ablation_factors(matrices, direction, 1.0, "full", rank=16, seed=7)
    torch.testing.assert_close(matrices + b_full @ a_full, explicit, atol=1e-4, rtol=1e-4)
    b_again, a_again = ablation_factors(matrices, direction, 1.0, "full", rank=3, seed=7)
    assert torch.equal(b, b_again) and torch.equal(a, a_again)


@pytest.mark.parametrize("weight", [0.3, 1.0, 1.6])
def test_exact_full_factors_are_the_explicit_matrix(matrices: torch.Tensor, direction: torch.Tensor, weight: float) -> None:
    """diag(s) (M + B A) is the norm-preserving ablation itself (rank 1 and a scale, no approximation)."""
    factors = norm_preserving_factors(matrices, direction, weight)
    assert factors.b.shape == (3, 16, 1) and factors.a.shape == (3, 1, 24)
    assert factors.scale is not None and factors.scale.shape == (3, 16) and factors.scale.dtype == torch.float32
    explicit = ablated_matrices(matrices, direction, weight, "full")
    torch.testing.assert_close(factors.merged(matrices), explicit, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(factors.merged(matrices).norm(dim=-1), matrices.norm(dim=-1), atol=1e-5, rtol=1e-5)
    # At weight 0 nothing changes: B A = 0 and every scale is 1.
    zero = norm_preserving_factors(matrices, direction, 0.0)
    assert zero.scale is not None and torch.equal(zero.merged(matrices), matrices * zero.scale.unsqueeze(-1))
    torch.testing.assert_close(zero.scale, torch.ones(3, 16), atol=1e-6, rtol=0)


def test_exact_full_factors_of_a_subspace(matrices: torch.Tensor) -> None:
    basis = orthonormal_rows(torch.randn(3, 16, generator=torch.Generator().manual_seed(5)))  # (k, out)
    factors = norm_preserving_factors(matrices, basis, 0.8)
    assert factors.b.shape == (3, 16, 3) and factors.a.shape == (3, 3, 24)
    torch.testing.assert_close(factors.merged(matrices), ablated_matrices(matrices, basis, 0.8, "full"), atol=1e-5, rtol=1e-5)


def test_exact_full_factors_do_not_depend_on_memory_alignment() -> None:
    """A rebuilt adapter must match its record bit for bit: the scale is computed in float64."""
    matrix = torch.randn(1, 64, 96, generator=torch.Generator().manual_seed(0))
    v = unit(torch.randn(64, generator=torch.Generator().manual_seed(1)))
    results = []
    for offset in range(8):
        buffer = torch.empty(matrix.numel() + offset)
        shifted = buffer[offset : offset + matrix.numel()].view_as(matrix)
        shifted.copy_(matrix)
        results.append(norm_preserving_factors(shifted, v, 0.9))
    assert all(all(torch.equal(x, y) for x, y in zip(result, results[0], strict=True)) for result in results)


def test_low_rank_approximation_does_not_depend_on_memory_alignment() -> None:
    """The same matrix at every offset of a buffer gives bit-identical factors (a rebuilt adapter must
    match its record's SHA-256; float32 BLAS results vary with alignment on some CPUs)."""
    matrix = torch.randn(1, 64, 96, generator=torch.Generator().manual_seed(0))
    results = []
    for offset in range(8):
        buffer = torch.empty(matrix.numel() + offset)
        shifted = buffer[offset : offset + matrix.numel()].view_as(matrix)
        shifted.copy_(matrix)
        results.append(low_rank_approximation(shifted, 3, seed=5))
    assert all(torch.equal(b, results[0][0]) and torch.equal(a, results[0][1]) for b, a in results)
    assert results[0][0].dtype == torch.float32


def test_chunks_cover_the_range_in_bounded_pieces() -> None:
    assert chunks(5, 10, limit=25) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert chunks(3, 100, limit=25) == [slice(0, 1), slice(1, 2), slice(2, 3)]  # at least one item per piece
    assert chunks(4, 1, limit=100) == [slice(0, 4)]


@pytest.mark.parametrize("exact", [True, False])
def test_factors_computed_in_pieces_are_bit_identical(
    monkeypatch: pytest.MonkeyPatch, matrices: torch.Tensor, direction: torch.Tensor, exact: bool
) -> None:
    """A large matrix's float64 work is done in pieces of rows (exact) or of experts (full, approximated);
    the factors are those of the whole, bit for bit (a rebuilt adapter must match its record)."""

    def compute() -> Factors:
        if exact:
            return norm_preserving_factors(matrices, direction, 0.9)
        return Factors(*ablation_factors(matrices, direction, 1.0, "full", rank=3, seed=7))

    whole = compute()
    monkeypatch.setattr(kernels, "CHUNK_ELEMENTS", 30)  # (3, 16, 24): one row, or one expert, per piece
    assert len(chunks(16, 3 * 24)) == 16 and len(chunks(3, 16 * 24)) == 3
    pieces = compute()
    assert all(torch.equal(x, y) for x, y in zip(whole, pieces, strict=True) if x is not None)


def test_approximate_factors_are_computed_one_expert_at_a_time(
    monkeypatch: pytest.MonkeyPatch, matrices: torch.Tensor, direction: torch.Tensor
) -> None:
    """Whole and pieces run the same code by construction: the randomized SVD never sees a batch of experts
    (a batched BLAS/LAPACK call may round an expert differently from the same expert alone), whatever the
    chunk size, and each expert's factors are those of that expert computed alone."""
    batches = []
    original = kernels.low_rank_approximation

    def spy(matrix: torch.Tensor, *args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        batches.append(matrix.shape[0])
        return original(matrix, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(kernels, "low_rank_approximation", spy)
    for limit in (1 << 23, 30):
        monkeypatch.setattr(kernels, "CHUNK_ELEMENTS", limit)
        b, a = ablation_factors(matrices, direction, 1.0, "full", rank=3, seed=7)
        assert batches == [1, 1, 1]
        batches.clear()
    probe = kernels.sketch(matrices.shape, 3, 7, matrices.dtype)[1:2]
    alone = original(ablated_matrices(matrices[1:2], direction, 1.0, "full") - matrices[1:2], 3, probe=probe)
    assert torch.equal(b[1:2], alone[0]) and torch.equal(a[1:2], alone[1])


def test_merged_factors_are_rounded_element_by_element(matrices: torch.Tensor) -> None:
    """M + B A is summed one outer product at a time: every element is the same whatever rows or experts
    it is merged with (a matrix product's rounding depends on its shape, kernel and alignment)."""
    generator = torch.Generator().manual_seed(11)
    factors = Factors(torch.randn(3, 16, 4, generator=generator), torch.randn(3, 4, 24, generator=generator))
    whole = factors.merged(matrices)
    torch.testing.assert_close(whole, matrices + factors.b @ factors.a, atol=1e-5, rtol=1e-5)
    for e, rows in ((0, slice(0, 1)), (2, slice(5, 11)), (1, slice(15, 16))):
        piece = Factors(factors.b[e : e + 1, rows].clone(), factors.a[e : e + 1].clone())
        assert torch.equal(piece.merged(matrices[e : e + 1, rows].clone()), whole[e : e + 1, rows])


def test_low_rank_approximation_is_exact_for_low_rank_input() -> None:
    generator = torch.Generator().manual_seed(3)
    low = torch.randn(2, 20, 2, generator=generator) @ torch.randn(2, 2, 30, generator=generator)
    b, a = low_rank_approximation(low, 2)
    torch.testing.assert_close(b @ a, low, atol=1e-4, rtol=1e-4)


def test_output_has_no_component_along_v_after_full_weight_ablation(matrices: torch.Tensor, direction: torch.Tensor) -> None:
    b, a = ablation_factors(matrices, direction, 1.0, "none")
    x = torch.randn(3, 24, 5, generator=torch.Generator().manual_seed(4))
    output = (matrices + b @ a) @ x  # (experts, out, tokens)
    assert torch.einsum("o,eot->et", direction, output).abs().max() < 1e-5


# --- KL and the Pareto front ---------------------------------------------------------------------


def test_kl_divergence() -> None:
    p = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]]), -1)
    q = torch.log_softmax(torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 0.0]]), -1)
    expected = float((p[0].exp() * (p[0] - q[0])).sum() / 2)
    assert kl_divergence(p, q) == pytest.approx(expected)
    assert kl_divergence(p, p) == 0.0
    masked = torch.tensor([[0.0, -math.inf]])
    assert kl_divergence(masked, masked) == 0.0  # 0 log 0 = 0


def result(number: int, refusals: int, kl: float, cut: bool = False) -> TrialResult:
    return TrialResult(number, refusals, kl, cut, 1.0, {})


def test_pareto_front_and_dominance() -> None:
    results = [
        result(0, 10, 0.1),
        result(1, 5, 0.3),
        result(2, 5, 0.5),
        result(3, 12, 0.05),
        result(4, 20, 0.2),
        result(5, 3, 0.01, cut=True),
    ]
    assert [r.number for r in pareto_front(results)] == [1, 0, 3]
    assert dominates((5, 0.3), (5, 0.5)) and not dominates((5, 0.3), (5, 0.3))
    assert is_dominated(10, 0.4, results)  # trial 1 has fewer refusals and lower KL
    assert not is_dominated(4, 0.4, results)
    assert not is_dominated(6, 0.009, results)  # cut trials never dominate: their refusals are lower bounds


def test_sampler_values_rank_near_identity_trials_by_refusals() -> None:
    assert sampler_values(30, 0.2, 100, 0.04) == [30.0, 0.2]  # above the floor: the scores themselves
    assert sampler_values(30, 0.2, 100, 0.0) == [30.0, 0.2]
    low_kl_many_refusals = sampler_values(52, 0.001, 100, 0.04)
    low_kl_fewer_refusals = sampler_values(45, 0.03, 100, 0.04)
    assert dominates(tuple(low_kl_fewer_refusals), tuple(low_kl_many_refusals))  # KL under the floor no longer counts
    assert low_kl_many_refusals[1] <= 0.04 and low_kl_fewer_refusals[1] <= 0.04
    assert not dominates(
        tuple(sampler_values(20, 0.05, 100, 0.04)), tuple(low_kl_fewer_refusals)
    )  # above the floor KL still counts


def test_headless_selection_rules() -> None:
    front = [result(1, 2, 0.9), result(2, 5, 0.3), result(3, 12, 0.05)]
    assert select(front, "fewest-refusals", 0.5, 0).number == 2
    assert select(front, "fewest-refusals", 0.01, 0).number == 3  # nothing under the cap: lowest KL
    assert select(front, "lowest-kl", 0.5, 5).number == 2
    assert select(front, "lowest-kl", 0.5, 1).number == 1  # nothing under the cap: fewest refusals


def test_hypervolume() -> None:
    assert hypervolume([(1, 5), (2, 3)], (10, 10)) == pytest.approx(61.0)
    assert hypervolume([(11, 1)], (10, 10)) == 0.0
    assert hypervolume([(1, 5), (1, 5), (3, 6)], (10, 10)) == pytest.approx(45.0)


# --- Subspaces, read positions, KL over several tokens --------------------------------------------


def test_orthonormal_rows_keep_the_first_direction() -> None:
    vectors = torch.tensor([[2.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    basis = orthonormal_rows(vectors)
    torch.testing.assert_close(basis, torch.eye(3))  # Gram-Schmidt of a triangular set: the standard basis


def test_subspace_ablation_removes_every_basis_direction(matrices: torch.Tensor) -> None:
    basis = orthonormal_rows(torch.randn(2, 16, generator=torch.Generator().manual_seed(1)))  # (k, out)
    for mode in ("none", "pre"):
        b, a = ablation_factors(matrices, basis, 1.0, mode)
        assert b.shape == (3, 16, 2) and a.shape == (3, 2, 24)  # rank k = 2, exact
        torch.testing.assert_close(matrices + b @ a, ablated_matrices(matrices, basis, 1.0, mode), atol=1e-5, rtol=1e-5)
    ablated = ablated_matrices(matrices, basis, 1.0, "none")
    torch.testing.assert_close(basis @ ablated, torch.zeros(3, 2, 24), atol=1e-5, rtol=0)  # V M' = 0 at w = 1
    # M - w V^T V M with V = [v1; v2] equals ablating v1, then v2 (orthogonal directions commute)
    one = ablated_matrices(ablated_matrices(matrices, basis[0], 0.7, "none"), basis[1], 0.7, "none")
    torch.testing.assert_close(ablated_matrices(matrices, basis, 0.7, "none"), one, atol=1e-5, rtol=1e-5)


def test_subspace_of_rank_one_is_the_single_direction(matrices: torch.Tensor) -> None:
    v = unit(torch.randn(16, generator=torch.Generator().manual_seed(2)))
    for mode in ("none", "pre", "full"):
        single = ablated_matrices(matrices, v, 1.2, mode)
        torch.testing.assert_close(ablated_matrices(matrices, v.unsqueeze(0), 1.2, mode), single, atol=1e-6, rtol=1e-6)


def test_subspace_bases_start_with_the_direction_and_find_the_second_axis() -> None:
    generator = torch.Generator().manual_seed(3)
    hidden, n = 8, 200
    # Paired differences along e0 (constant) and e1 (varying, zero mean): the basis is [e0, +-e1].
    harmless = torch.randn(n, 1, hidden, generator=generator) * 0.01
    spread = torch.randn(n, generator=generator)
    harmful = harmless.clone()
    harmful[:, 0, 0] += 3.0
    harmful[:, 0, 1] += spread - spread.mean()
    directions = refusal_directions(harmful, harmless, orthogonalize=False)
    bases = subspace_bases(harmful, harmless, directions, 2)
    assert bases.shape == (1, 2, hidden)
    torch.testing.assert_close(bases[0, 0], directions[0])
    assert abs(float(bases[0, 1, 1])) > 0.99
    torch.testing.assert_close(bases[0] @ bases[0].T, torch.eye(2), atol=1e-5, rtol=0)
    assert subspace_bases(harmful, harmless, directions, 1).shape == (1, 1, hidden)


def test_interpolated_subspace_is_orthonormal_and_exact_at_integers() -> None:
    bases = torch.stack([orthonormal_rows(torch.randn(3, 10, generator=torch.Generator().manual_seed(s))) for s in range(4)])
    torch.testing.assert_close(interpolate_subspace(bases, 2.0), bases[2], atol=1e-6, rtol=1e-6)
    mixed = interpolate_subspace(bases, 1.4)
    torch.testing.assert_close(mixed @ mixed.T, torch.eye(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[0], interpolate_direction(bases[:, 0], 1.4), atol=1e-6, rtol=1e-6)


def test_parameters_pick_a_basis_per_layer() -> None:
    bases = torch.stack([orthonormal_rows(torch.randn(2, 6, generator=torch.Generator().manual_seed(s))) for s in range(5)])
    assert torch.equal(AblationParameters("per-layer", 0.0).direction_for(bases, 1), bases[2])
    torch.testing.assert_close(AblationParameters("global", 2.0).direction_for(bases, 0), bases[3], atol=1e-6, rtol=1e-6)


def test_kl_over_tokens_averages_response_positions_only() -> None:
    vocab = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]))  # 3 positions
    reference = vocab.unsqueeze(0).repeat(2, 1, 1)  # (prompts 2, N 3, vocab 2)
    moved = reference.clone()
    moved[:, 2] = torch.log(torch.tensor([0.5, 0.5]))  # only the last position differs
    last_kl = 0.2 * math.log(0.2 / 0.5) + 0.8 * math.log(0.8 / 0.5)
    # prompt 0: 3 response positions -> last_kl / 3; prompt 1: continuation ended at once, 1 position -> last_kl
    value = kl_over_tokens(reference, moved, torch.tensor([3, 1]))
    assert value == pytest.approx((last_kl / 3 + last_kl) / 2, rel=1e-5)
    first = kl_divergence(reference[:, 2], moved[:, 2])
    assert kl_over_tokens(reference[:, 2:], moved[:, 2:], torch.tensor([1, 1])) == pytest.approx(first, rel=1e-6)


def test_read_positions_are_named_in_words() -> None:
    from heretic.directions import read_positions_text

    assert read_positions_text([-1]) == "last prompt token"
    assert read_positions_text([-5, -4, -3, -2, -1]) == "mean of the last 5 prompt tokens"
    assert read_positions_text([-3, -1]) == "mean of prompt positions -3, -1"


# --- Equal within the rounding of another machine -----------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_ulp_is_the_spacing_of_the_dtype_above_each_value(dtype: torch.dtype) -> None:
    values = (torch.randn(500, generator=torch.Generator().manual_seed(1)) * 10.0).to(dtype)
    values = torch.cat([values, torch.tensor([1.0, 0.5, 2.0**-3, -4.0], dtype=dtype)])
    above = torch.nextafter(values.abs(), torch.tensor(float("inf"), dtype=dtype))
    torch.testing.assert_close(ulp(values, dtype), (above.double() - values.abs().double()), atol=0, rtol=0)


def test_rebuilt_weights_within_rounding_are_equal_and_a_changed_ablation_is_not() -> None:
    """A weight computed again with float32 noise in the last bits and saved in bfloat16 lands on the same
    or a neighbouring value: within tolerance. The same weight ablated with a kernel weight 1 % apart is not."""
    generator = torch.Generator().manual_seed(2)
    matrix = torch.randn(64, 96, generator=generator) * 0.05
    v = unit(torch.randn(64, generator=generator))
    recorded = ablated_matrices(matrix[None], v, 0.8, "full")[0]
    # Another CPU: the direction read 1e-5 apart, and a few float32 ulps on every element.
    moved = unit(v + 1e-5 * torch.randn(64, generator=generator))
    noisy = ablated_matrices(matrix[None], moved, 0.8, "full")[0] * (1 + 4e-7 * torch.randn(64, 96, generator=generator))
    difference = compare_tensors("w", recorded, noisy)
    assert difference.within and difference.changed > 6000, difference
    assert compare_tensors("w", recorded.bfloat16(), noisy.bfloat16()).within
    # A bfloat16 weight rounded to its neighbour, on a tenth of the elements.
    saved = recorded.bfloat16()
    flipped = torch.where(torch.rand(64, 96, generator=generator) < 0.1, torch.nextafter(saved, -saved), saved)
    difference = compare_tensors("w", saved, flipped)
    assert difference.within and difference.changed > 500, difference
    other = ablated_matrices(matrix[None], v, 0.808, "full")[0]
    for saved in (torch.float32, torch.bfloat16):
        difference = compare_tensors("w", recorded.to(saved), other.to(saved))
        assert not difference.within and difference.worst_ratio > 2, difference
    assert compare_tensors("w", recorded, recorded.clone()) == Difference("w", 0.0, 0.0, 0, 64 * 96)
    assert compare_tensors("w", recorded, recorded[:10]).problem is not None
    assert compare_tensors("w", recorded, recorded.half()).problem is not None


def test_kernels_compute_in_float64_only_on_the_cpu(matrices: torch.Tensor, direction: torch.Tensor) -> None:
    """MPS has no float64 and consumer GPUs run it at 1/32-1/64 speed: off the CPU (here the meta device,
    which has no data but runs the same code) the exact and approximate kernels never make a float64 tensor."""
    from torch.overrides import TorchFunctionMode

    class Dtypes(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: set[torch.dtype] = set()

        def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            result = func(*args, **(kwargs or {}))
            for item in result if isinstance(result, tuple) else (result,):
                if isinstance(item, torch.Tensor):
                    self.seen.add(item.dtype)
            return result

    assert kernels.wide_dtype(torch.device("cpu")) == torch.float64
    assert kernels.wide_dtype(torch.device("mps")) == kernels.wide_dtype(torch.device("cuda", 0)) == torch.float32
    for device, expected in (("cpu", True), ("meta", False)):
        with Dtypes() as mode:
            exact = norm_preserving_factors(matrices.to(device), direction.to(device), 0.9)
            approximate = ablation_factors(matrices.to(device), direction.to(device), 1.0, "full", rank=3, seed=7)
        assert (torch.float64 in mode.seen) is expected, (device, mode.seen)
        assert exact.b.device.type == approximate[0].device.type == device
