"""Group-wise asymmetric round-to-nearest quantization of a linear with salient channels."""

import torch
from rosaq_kernels.packing import pack, pack_zeros

#: Clip search (``clip=True``): shrink factors tried for each group's range, 1.0 down to 0.21 in steps of 0.01, and
#: the norm of the error they minimise (GPTQ's and QuaRot's ``mse`` weight quantizer: ``maxshrink`` 0.8, grid 100,
#: ``norm`` 2.4).
CLIP_SHRINKS = tuple(1 - i / 100 for i in range(80))
CLIP_NORM = 2.4


def group_params(groups: torch.Tensor, qmax: int, clip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of every group of an asymmetric grid whose range includes 0.

    Args:
        groups: float ``[..., group_size]`` weights, one group per last-dim row.
        clip: search a shrunken range ``p · [min, max]`` (:data:`CLIP_SHRINKS`) per group, keeping the one with the
            least ``Σ |w − deq(q(w))|^2.4`` (clipping the extremes of a group refines the grid for the rest);
            ``False``: the group's min/max.
    Returns:
        float64 ``scale`` (values of float16, never 0) and ``zero`` (integers in ``[0, qmax]``), shape ``[...]``.
    """
    w = groups.to(torch.float64)
    w_min = w.amin(-1).clamp(max=0)
    w_max = w.amax(-1).clamp(min=0)

    def params(shrink: float) -> tuple[torch.Tensor, torch.Tensor]:
        scale = ((w_max - w_min) * shrink / qmax).to(torch.float16)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(torch.float64)
        return scale, torch.round(-w_min * shrink / scale).clamp(0, qmax)

    def error(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
        return (((torch.round(w / s) + z).clamp(0, qmax) - z) * s - w).abs().pow(CLIP_NORM).sum(-1)

    scale, zero = params(1.0)
    if not clip:
        return scale, zero
    best_err = error(scale, zero)
    for shrink in CLIP_SHRINKS[1:]:  # [0] is 1.0, the min/max grid above
        s, z = params(shrink)
        err = error(s, z)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale, zero


def quantize_groups(
    weight: torch.Tensor, bits: int, group_size: int, clip: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric RTN along the input dimension on the grid of :func:`group_params`.

    The range of every group includes 0, so a zero weight is exactly representable (its code is
    the zero point).

    Args:
        weight: float ``[N, K]`` with ``K % group_size == 0``.
        clip: search each group's range (:func:`group_params`); ``False``: min/max.
    Returns:
        codes int32 ``[N, K]`` in ``[0, 2**bits)``, scales float16 ``[N, K // group_size]``,
        zeros uint8 ``[N, K // group_size]``.
    """
    n_rows, in_features = weight.shape
    if in_features % group_size:
        raise ValueError(f"group_size {group_size} does not divide the {in_features} input channels")
    qmax = 2**bits - 1
    w = weight.to(torch.float64).view(n_rows, in_features // group_size, group_size)
    s, zeros = group_params(w, qmax, clip)
    codes = (torch.round(w / s.unsqueeze(-1)) + zeros.unsqueeze(-1)).clamp(0, qmax)
    return codes.view(n_rows, in_features).to(torch.int32), s.to(torch.float16), zeros.to(torch.uint8)


def quantize_linear(
    weight: torch.Tensor, salient_idx: torch.Tensor, bits: int, group_size: int, clip: bool = False
) -> dict[str, torch.Tensor]:
    """Checkpoint tensors of one linear: fp16 salient columns plus packed codes of the rest.

    Args:
        weight: float ``[N, K]`` in the linear's final (rotated) input basis.
        salient_idx: int32 ``[S]`` ascending channels kept in float16; their columns are zeroed
            before quantization, so they cost nothing in the quantized part.
        clip: search each group's range (:func:`group_params`).
    Returns:
        ``qweight``, ``scales``, ``qzeros``, ``salient_idx``, ``salient_weight`` (see ``checkpoint``).
    """
    idx = salient_idx.long()
    rest = weight.to(torch.float64).clone()
    rest[:, idx] = 0
    codes, scales, zeros = quantize_groups(rest, bits, group_size, clip)
    return {
        "qweight": pack(codes, bits),
        "scales": scales,
        "qzeros": pack_zeros(zeros, bits),
        "salient_idx": salient_idx.to(torch.int32).contiguous(),
        "salient_weight": weight[:, idx].to(torch.float16).contiguous(),
    }
