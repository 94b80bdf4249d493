"""Choose the salient (full-precision) input channels of a linear."""

import torch

from offline_quantizer.quantize import quantize_groups

#: what ranks the channels kept in float16: their activation energy ``E[x_j²]`` (the paper's principal channels), or
#: :func:`rounding_sensitivity` (OWQ's: the energy times the column's round-to-nearest error)
SALIENT_CRITERIA = ("energy", "sensitivity")


def select_salient(priority: torch.Tensor, num_salient: int) -> torch.Tensor:
    """The ``num_salient`` channels of largest priority, ascending, int32 ``[num_salient]``.

    Args:
        priority: ``[in_features]`` per-channel score in the linear's (rotated) input basis, e.g. ``E[x_i²]``.
    """
    if not 0 <= num_salient < priority.numel():
        raise ValueError(f"num_salient must be in [0, {priority.numel()}), got {num_salient}")
    top = torch.topk(priority.to(torch.float64), num_salient).indices
    return torch.sort(top).values.to(torch.int32)


def salient_priority(energy: torch.Tensor, outliers: torch.Tensor) -> torch.Tensor:
    """``energy`` with the ``outliers`` channels ranked above every other, among themselves by their own energy.

    Args:
        energy: float ``[in_features]`` per-channel score (non-negative), e.g. ``E[x_i²]``.
        outliers: bool ``[in_features]`` channels that are salient first (massive activations).
    Returns:
        float ``[in_features]``: the priority :func:`select_salient` takes, so that with more outliers than
        salient channels the outliers of largest energy are kept.
    """
    return torch.where(outliers, energy + energy.max() + 1.0, energy)


def rounding_sensitivity(weight: torch.Tensor, energy: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """OWQ's sensitivity of every input channel (Lee et al., 2023): ``energy_j · Σ_n (W_nj − RTN(W)_nj)²``.

    It is the output error ``E‖ΔW_{:,j} x_j‖²`` that keeping channel ``j`` in float16 removes, exact for
    round-to-nearest where the input's second moment is diagonal (a PCA basis). RTN is the min/max grid of each
    group with all of its channels (:func:`quantize.quantize_groups`).

    Args:
        weight: float ``[N, K]`` in the linear's final input basis, ``K % group_size == 0``.
        energy: float ``[K]`` per-channel ``E[x_j²]`` in the same basis.
    Returns:
        float64 ``[K]``.
    """
    n_rows, in_features = weight.shape
    codes, scales, zeros = quantize_groups(weight, bits, group_size)
    grouped = (n_rows, in_features // group_size, group_size)
    dequantized = (codes.view(grouped) - zeros.unsqueeze(-1).to(torch.float64)) * scales.unsqueeze(-1).to(torch.float64)
    error = (weight.to(torch.float64).view(grouped) - dequantized).square().sum(0).reshape(-1)
    return energy.to(torch.float64) * error.to(energy.device)
