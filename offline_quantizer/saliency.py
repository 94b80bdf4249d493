"""Choose the salient (full-precision) input channels of a linear."""

import torch


def select_salient(energy: torch.Tensor, num_salient: int) -> torch.Tensor:
    """The ``num_salient`` channels with the largest activation energy, ascending, int32 ``[num_salient]``.

    Args:
        energy: ``[in_features]`` per-channel ``E[x_i²]`` in the linear's (rotated) input basis.
    """
    if not 0 <= num_salient < energy.numel():
        raise ValueError(f"num_salient must be in [0, {energy.numel()}), got {num_salient}")
    top = torch.topk(energy.to(torch.float64), num_salient).indices
    return torch.sort(top).values.to(torch.int32)


def salient_priority(energy: torch.Tensor, outliers: torch.Tensor) -> torch.Tensor:
    """``energy`` with the ``outliers`` channels ranked above every other, among themselves by their own energy.

    Args:
        energy: float ``[in_features]`` per-channel ``E[x_i²]`` (non-negative).
        outliers: bool ``[in_features]`` channels that are salient first (massive activations).
    Returns:
        float ``[in_features]``: the priority :func:`select_salient` takes, so that with more outliers than
        salient channels the outliers of largest energy are kept.
    """
    return torch.where(outliers, energy + energy.max() + 1.0, energy)
