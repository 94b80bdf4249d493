"""The torch reference of a ROSAQ linear: the definition of correct for every kernel.

A ROSAQ linear with ``in_features = K`` and ``out_features = N`` computes::

    x' = x · blockdiag(rot)                      (only where the checkpoint has an online rotation)
    y  = x'[:, salient_idx] · salient_weightᵀ + x' · deq(qweight)ᵀ  (+ bias, added by the caller)

``deq(qweight)[n, k] = (code[n, k] - qzeros[n, k // g]) · scales[n, k // g]``; the columns of the salient
channels are zero in the quantized part (their code equals the zero point).
"""

import torch
from rosaq_kernels.packing import unpack


def dequantize(
    qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """Dequantize to float32 ``[N, K]``.

    Args:
        qweight: int32 ``[N, packed_width(K, bits)]``.
        scales: float ``[N, K // group_size]``.
        qzeros: uint8 ``[N, K // group_size]`` (zero points, ``0 <= z < 2**bits``).
    """
    codes = unpack(qweight, bits).to(torch.float32)
    n_rows, in_features = codes.shape
    grouped = codes.view(n_rows, in_features // group_size, group_size)
    deq = (grouped - qzeros.to(torch.float32).unsqueeze(-1)) * scales.to(torch.float32).unsqueeze(-1)
    return deq.view(n_rows, in_features)


def rotate_blocks(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Apply a block-diagonal rotation: ``x [M, nb*B] · blockdiag(rot [nb, B, B])`` in float32."""
    n_blocks, block, _ = rot.shape
    xb = x.to(torch.float32).view(x.shape[0], n_blocks, block)
    return torch.einsum("mnb,nbc->mnc", xb, rot.to(torch.float32)).reshape(x.shape[0], n_blocks * block)


def rosaq_linear_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor,
    salient_idx: torch.Tensor,
    salient_weight: torch.Tensor,
    rot: torch.Tensor | None,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """Reference ROSAQ linear (no bias), computed in float32 and returned in ``x.dtype``.

    Args:
        x: ``[M, K]`` activations (fp16, bf16 or fp32).
        qweight, scales, qzeros: the quantized part (see :func:`dequantize`).
        salient_idx: int32 ``[S]`` input channels kept in full precision (``S`` may be 0).
        salient_weight: ``[N, S]`` their weights.
        rot: ``[nb, B, B]`` online block rotation with ``nb * B == K``, or ``None``.
    Returns:
        ``[M, N]`` in ``x.dtype``.
    """
    xr = rotate_blocks(x, rot) if rot is not None else x.to(torch.float32)
    y = xr @ dequantize(qweight, scales, qzeros, bits, group_size).t()
    if salient_idx.numel():
        y = y + xr[:, salient_idx.long()] @ salient_weight.to(torch.float32).t()
    return y.to(x.dtype)
