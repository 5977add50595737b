"""The "mse" grid search's CPU kernel (lowbit::mse_grid) against its reference, quantize._mse_grid, on every ISA.

The kernel repeats the reference's float32 arithmetic step by step and adds its sums in torch's order, so the
scales and zero points come out identical; the tests also bound the squared error of every group by the
reference's, which is what matters should a group ever differ.
"""

import pytest
import torch

import lowbit
from lowbit import quantize as Q


def mse_grid(groups, weight, bits, integer_zeros):
    return torch.ops.lowbit.mse_grid(groups, weight, float(bits), Q.MSE_RATIOS, Q.MSE_REFITS, integer_zeros)


def reference(groups, weight, bits, integer_zeros):
    return Q._mse_grid(groups, bits, integer_zeros, 1.0 if weight is None else weight)


def squared_error(groups, weight, bits, scales, zeros):
    diff = Q.grid_values(Q.round_to_grid(groups, scales, zeros, bits), scales, zeros, bits) - groups
    return (diff.double().square() * (1.0 if weight is None else weight.double())).sum(-1)


def check_against_reference(groups, weight, bits, integer_zeros, min_identical=0.999):
    scales, zeros = mse_grid(groups, weight, bits, integer_zeros)
    ref_scales, ref_zeros = reference(groups, weight, bits, integer_zeros)
    assert scales.dtype == zeros.dtype == torch.float16 and scales.shape == zeros.shape == groups.shape[:-1]
    identical = (scales == ref_scales) & (zeros == ref_zeros)
    assert identical.float().mean().item() >= min_identical
    error, ref_error = (squared_error(groups, weight, bits, *grid) for grid in ((scales, zeros),
                                                                                 (ref_scales, ref_zeros)))
    assert (error <= ref_error * (1 + 1e-5) + 1e-30).all()
    return identical


def column_weights(kind, shape):
    """None, all real columns, real columns (bool, the last group padded), or per-column input energies (gptq)."""
    if kind == "none":
        return None
    if kind == "ones":
        return torch.ones(shape)
    if kind == "padding":
        mask = torch.ones(shape, dtype=torch.bool)
        mask[-1, shape[-1] // 3:] = False
        return mask.float()
    return torch.rand(shape) * torch.logspace(-2, 2, shape[-1])[torch.randperm(shape[-1])]


@pytest.mark.parametrize("bits", [4, 3.5, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, 256, 20, 7])
@pytest.mark.parametrize("weights", ["none", "ones", "padding", "energy"])
def test_mse_grid_matches_reference(isa, bits, group_size, weights):
    # [rows, groups, group_size] as quantize_weight passes them; weights per (group, column) broadcast over rows.
    # Group sizes 20 and 7: GPTQ's last group of a layer whose in_features is not a multiple of the group size.
    groups = torch.randn(40, 6, group_size) * torch.logspace(-3, 1, 40)[:, None, None]
    groups[::3] += 0.5 * groups[::3].abs().mean()  # shifted groups: zero points away from the middle
    weight = column_weights(weights, (6, group_size))
    for integer_zeros in (False, True):
        check_against_reference(groups, weight, bits, integer_zeros)


@pytest.mark.parametrize("bits", [2, 3, 5, 6, 7])
def test_mse_grid_reference_only_bit_widths(isa, bits):
    # fake_quantize's uniform baselines go through the same search.
    check_against_reference(torch.randn(300, 64), None, bits, False)


@pytest.mark.parametrize("bits", [4, 3.5, 8])
def test_mse_grid_edge_cases(isa, bits):
    rows = [
        torch.zeros(32),                                    # all zero: the smallest float16 scale
        torch.full((32,), 0.75), torch.full((32,), -3.0),   # constant: every code the same, no fit
        torch.arange(32.0) * 1e-3 + 5.0,                    # far from zero: the range reaches 0
        torch.linspace(-1, 1, 32) * 4.5e5,                  # near the largest float16 scales
        torch.linspace(-1, 1, 32) * 1e-6,                   # scales in float16's subnormals
        torch.randn(32) * 1e-30,                            # below the smallest float16 scale
        torch.randn(32) * 1e-40,                            # float32 subnormals
        torch.cat([torch.full((31,), 1e-4), torch.tensor([4e5])]),  # one huge value among tiny ones
        torch.tensor([-0.0, 0.0] * 16),                     # signed zeros
        torch.tensor([1.0, -1.0] * 16),                     # two values
    ]
    groups = torch.stack(rows)
    assert check_against_reference(groups, None, bits, False, min_identical=1.0).all()
    assert check_against_reference(groups, None, bits, True, min_identical=1.0).all()
    # Padding columns (weight 0) count toward the range but not the error; a group of padding only has no fit.
    weight = torch.ones(len(rows), 32)
    weight[:, 20:] = 0
    weight[0] = 0
    assert check_against_reference(groups, weight, bits, False, min_identical=1.0).all()


def test_mse_grid_range_beyond_float16_raises_and_nan_stays_nan(isa):
    groups = torch.zeros(3, 64)
    groups[1, 5] = 1e7
    with pytest.raises(ValueError, match="exceeds float16"):
        mse_grid(groups, None, 4, False)
    with pytest.raises(ValueError, match="exceeds float16"):
        lowbit.quantize_weight(groups, 4, 64)
    # A NaN weight (quantize_weight refuses them; GPTQ's corrections could make one) gives its group NaN, as the
    # reference does, and no error.
    groups[1, 5] = float("nan")
    for scales, zeros in (mse_grid(groups, None, 4, False), reference(groups, None, 4, False)):
        assert scales.isnan().tolist() == zeros.isnan().tolist() == [False, True, False]


def test_mse_grid_argument_checks():
    groups = torch.randn(4, 32)
    with pytest.raises(TypeError, match="float32"):
        mse_grid(groups.double(), None, 4, False)
    with pytest.raises(TypeError, match="float32"):
        mse_grid(groups, torch.ones(32, dtype=torch.bool), 4, False)
    with pytest.raises(ValueError, match="trailing dimensions"):
        mse_grid(groups, torch.ones(16), 4, False)
    with pytest.raises(ValueError, match="bits"):
        mse_grid(groups, None, 4.5, False)
    empty_scales, empty_zeros = mse_grid(torch.empty(0, 5, 32), None, 4, False)
    assert empty_scales.shape == empty_zeros.shape == (0, 5)


def test_mse_grid_independent_of_threads_and_layout():
    groups = torch.randn(3001, 64)
    weight = torch.rand(64)
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(mse_grid(groups, weight, 4, False))
    finally:
        torch.set_num_threads(previous)
    transposed = groups.t().contiguous().t()  # the same values, not contiguous
    results.append(mse_grid(transposed, weight, 4, False))
    for scales, zeros in results[1:]:
        assert torch.equal(scales, results[0][0]) and torch.equal(zeros, results[0][1])


@pytest.mark.parametrize("bits", [4, 3.5, 8])
def test_opcheck_mse_grid(bits):
    groups = torch.randn(5, 3, 64)
    for weight in (None, torch.rand(3, 64), torch.rand(64)):
        torch.library.opcheck(torch.ops.lowbit.mse_grid.default,
                              (groups, weight, float(bits), list(Q.MSE_RATIOS), Q.MSE_REFITS, False))
    torch.library.opcheck(torch.ops.lowbit.mse_grid.default, (groups, None, float(bits), [1.0, 0.9], 1, True))


@pytest.mark.parametrize("bits", [4, 3.5, 8])
@pytest.mark.parametrize("integer_zeros", [False, True])
def test_group_grid_takes_the_kernel_with_the_reference_grid(bits, integer_zeros):
    # quantize_weight's grids (bool columns for the padding) and GPTQ's (float columns [L]) are the reference's.
    w = torch.randn(96, 200)
    qw = lowbit.quantize_weight(w, bits, 64, integer_zeros=integer_zeros)
    groups = Q.grouped(w, None, 64)
    columns = (torch.arange(groups.shape[1] * 64) < 200).view(-1, 64)
    assert torch.equal(qw.scales, reference(groups, columns.float(), bits, integer_zeros)[0])
    assert torch.equal(qw.zeros, reference(groups, columns.float(), bits, integer_zeros)[1])
    energy = torch.rand(40) * 10
    grid = Q.group_grid(w[:, :40], bits, integer_zeros=integer_zeros, columns=energy)
    ref = reference(w[:, :40], energy, bits, integer_zeros)
    assert torch.equal(grid[0], ref[0]) and torch.equal(grid[1], ref[1])
