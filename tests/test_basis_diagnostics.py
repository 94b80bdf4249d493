"""The diagnostics behind docs/accuracy.md's basis findings: grid detection and GPTQ's dependence on the basis."""

import torch

from benchmarks.gptq_basis import relative_errors, site_bases
from benchmarks.grid_alignment import distinct_fraction, relative_rtn_error


def _correlated_moment(k: int, gen: torch.Generator) -> torch.Tensor:
    """A float64 ``[k, k]`` second moment with strong correlations and a spread spectrum."""
    mixing = torch.randn(k, k, generator=gen, dtype=torch.float64) * torch.logspace(0, -2, k, dtype=torch.float64)
    x = torch.randn(4 * k, k, generator=gen, dtype=torch.float64) @ mixing.t()
    return x.t() @ x / x.shape[0]


def test_distinct_fraction_finds_a_4bit_grid_per_block():
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (8, 128), generator=gen).double()
    scale = torch.rand(8, 4, 1, generator=gen, dtype=torch.float64) + 0.1
    on_grid = (codes.view(8, 4, 32) * scale - 0.5).view(8, 128)
    assert distinct_fraction(on_grid) == 1.0
    assert distinct_fraction(torch.randn(8, 128, generator=gen, dtype=torch.float64)) == 0.0


def test_rtn_error_is_zero_on_the_quantizers_own_grid_and_not_after_a_permutation():
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (16, 256), generator=gen).double()
    codes[:, ::64] = 0  # every group of 64 spans the full code range, so min/max RTN recovers its grid exactly
    codes[:, 1::64] = 15
    scale = (torch.rand(16, 4, 1, generator=gen, dtype=torch.float64) + 0.5).half().double()
    weight = ((codes.view(16, 4, 64) - 7) * scale).view(16, 256)
    assert relative_rtn_error(weight, 4, 64) < 1e-12
    assert relative_rtn_error(weight[:, torch.randperm(256, generator=gen)], 4, 64) > 1e-3


def test_gptq_equals_rtn_in_the_pca_basis_and_beats_it_in_the_original_basis():
    gen = torch.Generator().manual_seed(2)
    k, n = 128, 64
    moment = _correlated_moment(k, gen)
    weight = torch.randn(n, k, generator=gen, dtype=torch.float64)
    bases = site_bases(moment, num_salient=16)
    for num_salient in (0, 16):
        rtn_pca, gptq_pca = relative_errors(weight, moment, bases["pca"], num_salient, 3, 32)
        assert abs(gptq_pca - rtn_pca) <= 1e-9 * rtn_pca  # H is diagonal there: nothing to compensate
        rtn, gptq = relative_errors(weight, moment, bases["original"], num_salient, 3, 32)
        assert 0 < gptq < 0.8 * rtn
    # mixing the complement keeps the salient (principal) subspace: the 16 largest-energy channels span it
    mixed = bases["pca+mix"]
    assert torch.allclose(mixed[:, :16], bases["pca"][:, :16])
    assert torch.allclose(mixed.t() @ mixed, torch.eye(k, dtype=torch.float64), atol=1e-12)
