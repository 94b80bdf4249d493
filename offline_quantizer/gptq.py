"""Error-compensating (GPTQ) rounding of a linear with fp16 salient channels, in its final input basis.

GPTQ (Frantar et al., 2022) rounds the input columns one at a time and spreads each column's rounding
error over the columns not yet rounded, weighted by the inverse second moment ``H = E[x xᵀ]`` of the
input, which minimises ``‖X ΔWᵀ‖``. Here the non-salient columns are rounded either in natural order
(every group's scale and zero point come from already-updated weights, as in GPTQ without act-order) or,
with ``act_order``, by decreasing ``H_kk`` with every group's scale and zero point fixed beforehand from
the original weights (GPTQ's "static" activation order, llm-compressor's default: the columns that matter
most are rounded first, while the most error can still be compensated). The salient columns go last:
they are never rounded, so they absorb the accumulated compensation exactly (as OWQ does with its fp16
"weak columns"). The grid is that of :func:`quantize.group_params`
(asymmetric per group, range including 0, min/max or clip-searched, fp16 scales, packed zero points), so the output
is an ordinary ROSAQ linear. In a basis where ``H`` is diagonal (``per-layer``: each site's own PCA basis) the updates
vanish and GPTQ equals round-to-nearest.
"""

import torch
from rosaq_kernels.packing import pack, pack_zeros

from offline_quantizer.quantize import group_params


@torch.no_grad()
def gptq_quantize_linear(
    weight: torch.Tensor, hessian: torch.Tensor, salient_idx: torch.Tensor, bits: int, group_size: int,
    damping: float = 0.01, block: int = 128, act_order: bool = False, clip: bool = False,
) -> dict[str, torch.Tensor]:
    """Checkpoint tensors of one linear (as :func:`quantize.quantize_linear`) with GPTQ rounding.

    Args:
        weight: float ``[N, K]`` in the linear's final input basis.
        hessian: float ``[K, K]`` second moment of the input in the same basis.
        salient_idx: int ``[S]`` ascending channels kept in float16 (they receive the compensation).
        damping: added to the diagonal of ``hessian`` as a fraction of its mean.
        act_order: round the non-salient columns by decreasing ``hessian`` diagonal, with group parameters
            from the original weights (see the module docstring).
        clip: search each group's range (:func:`quantize.group_params`) instead of its min/max.
    """
    n_rows, k = weight.shape
    if k % group_size:
        raise ValueError(f"group_size {group_size} does not divide the {k} input channels")
    device = weight.device
    qmax = 2**bits - 1
    w = weight.to(torch.float64).clone()
    h = hessian.to(device, torch.float64).clone()
    dead = torch.diagonal(h) <= 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    sal = salient_idx.to(device).long()
    is_salient = torch.zeros(k, dtype=torch.bool, device=device)
    is_salient[sal] = True
    quantized = torch.nonzero(~is_salient).flatten()
    n_groups = k // group_size
    scales = torch.ones(n_rows, n_groups, dtype=torch.float64, device=device)
    zeros = torch.zeros(n_rows, n_groups, dtype=torch.float64, device=device)
    have_params = torch.zeros(n_groups, dtype=torch.bool)
    if act_order:
        quantized = quantized[torch.argsort(torch.diagonal(h)[quantized], descending=True, stable=True)]
        # min/max over each group's non-salient weights (salient ones read as 0)
        scales, zeros = group_params(w.masked_fill(is_salient, 0.0).view(n_rows, n_groups, group_size), qmax, clip)
        have_params[:] = True
    order = torch.cat([quantized, sal])
    n_quant = k - sal.numel()
    w = w[:, order]
    h = h[order][:, order]
    h += damping * torch.diagonal(h).mean() * torch.eye(k, dtype=h.dtype, device=device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    codes = torch.zeros(n_rows, k, dtype=torch.float64, device=device)  # in permuted order
    cols = order.tolist()
    for i1 in range(0, n_quant, block):
        i2 = min(i1 + block, n_quant)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = cols[i1 + i]
            g = col // group_size
            if not have_params[g]:
                # the non-salient columns of group g are contiguous in the permuted order, starting here
                end = i1 + i + int((~is_salient[g * group_size:(g + 1) * group_size]).sum())
                values = torch.cat([w1[:, i:], w[:, i2:end]], dim=1) if end > i2 else w1[:, i:end - i1]
                scales[:, g], zeros[:, g] = group_params(values, qmax, clip)
                have_params[g] = True
            s, z = scales[:, g], zeros[:, g]
            q = (torch.round(w1[:, i] / s) + z).clamp(0, qmax)
            codes[:, i1 + i] = q
            err = (w1[:, i] - (q - z) * s) / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    inverse = torch.argsort(order)
    codes = codes[:, inverse]
    final = w[:, inverse]
    group_of = torch.arange(k, device=device) // group_size
    codes[:, sal] = zeros[:, group_of[sal]]  # salient columns contribute exactly 0 in the quantized part
    return {
        "qweight": pack(codes.to(torch.int32).cpu(), bits),
        "scales": scales.to(torch.float16).cpu(),
        "qzeros": pack_zeros(zeros.to(torch.int32).cpu(), bits),
        "salient_idx": salient_idx.to(torch.int32).cpu().contiguous(),
        "salient_weight": final[:, sal].to(torch.float16).cpu().contiguous(),
    }
