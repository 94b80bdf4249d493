"""Group-wise asymmetric round-to-nearest quantization of a linear with salient channels."""

import torch
from rosaq_kernels.packing import pack, pack_zeros


def quantize_groups(
    weight: torch.Tensor, bits: int, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max RTN along the input dimension.

    The range of every group includes 0, so a zero weight is exactly representable (its code is
    the zero point).

    Args:
        weight: float ``[N, K]`` with ``K % group_size == 0``.
    Returns:
        codes int32 ``[N, K]`` in ``[0, 2**bits)``, scales float16 ``[N, K // group_size]``,
        zeros uint8 ``[N, K // group_size]``.
    """
    n_rows, in_features = weight.shape
    if in_features % group_size:
        raise ValueError(f"group_size {group_size} does not divide the {in_features} input channels")
    qmax = 2**bits - 1
    w = weight.to(torch.float64).view(n_rows, in_features // group_size, group_size)
    w_min = w.amin(-1).clamp(max=0)
    w_max = w.amax(-1).clamp(min=0)
    scale = ((w_max - w_min) / qmax).to(torch.float16)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    s = scale.to(torch.float64)
    zeros = torch.round(-w_min / s).clamp(0, qmax)
    codes = (torch.round(w / s.unsqueeze(-1)) + zeros.unsqueeze(-1)).clamp(0, qmax)
    return codes.view(n_rows, in_features).to(torch.int32), scale, zeros.to(torch.uint8)


def quantize_linear(
    weight: torch.Tensor, salient_idx: torch.Tensor, bits: int, group_size: int
) -> dict[str, torch.Tensor]:
    """Checkpoint tensors of one linear: fp16 salient columns plus packed codes of the rest.

    Args:
        weight: float ``[N, K]`` in the linear's final (rotated) input basis.
        salient_idx: int32 ``[S]`` ascending channels kept in float16; their columns are zeroed
            before quantization, so they cost nothing in the quantized part.
    Returns:
        ``qweight``, ``scales``, ``qzeros``, ``salient_idx``, ``salient_weight`` (see ``checkpoint``).
    """
    idx = salient_idx.long()
    rest = weight.to(torch.float64).clone()
    rest[:, idx] = 0
    codes, scales, zeros = quantize_groups(rest, bits, group_size)
    return {
        "qweight": pack(codes, bits),
        "scales": scales,
        "qzeros": pack_zeros(zeros, bits),
        "salient_idx": salient_idx.to(torch.int32).contiguous(),
        "salient_weight": weight[:, idx].to(torch.float16).contiguous(),
    }
