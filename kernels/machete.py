"""vLLM's Machete (CUTLASS, Hopper) for the INT4 part of a ROSAQ linear at large M.

From :data:`MACHETE_MIN_M` rows on, the fused Triton kernel is slower than vLLM's own W4A16 GEMM
(``BENCHMARKS.md``), so a W4 layer on an sm_90 GPU keeps a second copy of its INT4 weights in Machete's
layout (built once at load by :func:`machete_weights`; the checkpoint format is unchanged) and
:func:`machete_linear` computes::

    x' = x · blockdiag(rot)                                  (only when ``rot`` is given)
    y  = machete(x', deq(qweight)) + x'[:, salient_idx] · salient_weightᵀ

The quantized part covers every input channel (the salient columns' codes are their zero points, so they
dequantize to 0), so Machete sees a plain asymmetric ``uint4`` g64/g128 GEMM: AWQ's path in vLLM. The
salient channels are a second pass that adds their product into Machete's output: below
:data:`SALIENT_KERNEL_MAX_M` rows one Triton launch that gathers their columns of ``x'`` itself
(``rosaq_kernels.salient``), from there on ``index_select`` + cuBLAS ``addmm`` (the Triton kernel re-gathers ``x'``
for every output tile, which costs more than one gather once the rows are many). Machete's dequantization is
``code · s + z`` with ``z = -zero · s`` rounded to the activation dtype, as vLLM does for AWQ.

The cost is memory: the INT4 weights are held twice (Triton's tile layout for small M, Machete's for large
M). ``ROSAQ_MACHETE=0`` in the environment keeps only the Triton path.

Nothing here imports vLLM at module import: Machete's ops (``torch.ops._C``) exist only once vLLM's
extension is loaded, which is the case inside vLLM and in the benchmarks.
"""

from __future__ import annotations

import functools
import os

import torch

#: Environment variable: ``0`` keeps only the Triton path (no second copy of the INT4 weights).
MACHETE_ENV = "ROSAQ_MACHETE"
#: From this many rows (tokens) on, ``torch.ops.rosaq.linear`` sends a W4 layer to Machete (the H200 crossover of
#: 2026-12-04 in BENCHMARKS.md: Triton 107 vs Machete path 131 µs per Llama-2-7B layer at 32 rows, 168 vs 145 at 64).
MACHETE_MIN_M = 64
#: Below this many rows the salient channels take the one-launch Triton epilogue, from here on index_select + addmm
#: (H200, 2026-12-04, µs per Llama-2-7B layer: 19.4 vs 29.0 at 64 rows, 37.8 vs 35.7 at 256, BENCHMARKS.md).
SALIENT_KERNEL_MAX_M = 256
#: Group sizes Machete supports for fp16/bf16 activations (vLLM's ``query_machete_supported_group_sizes``).
MACHETE_GROUP_SIZES = (64, 128)
#: Machete's prepacked block: input channels must be a multiple of the first, outputs of the second.
MACHETE_BLOCK = (64, 128)


@functools.cache
def _uint4_id() -> int:
    from vllm.scalar_type import scalar_types

    return scalar_types.uint4.id


def _machete_ops_loaded() -> bool:
    """Whether ``torch.ops._C.machete_mm`` exists (importing vLLM's ops module loads its extension)."""
    if not hasattr(torch.ops._C, "machete_mm"):
        try:
            import vllm._custom_ops  # noqa: F401
        except ImportError:
            return False
    return hasattr(torch.ops._C, "machete_mm")


def machete_supported(device: torch.device, bits: int, group_size: int, in_features: int, out_features: int,
                      act_dtype: torch.dtype) -> bool:
    """Whether a layer of this shape can take the Machete path on ``device`` (and ``ROSAQ_MACHETE`` allows it)."""
    if os.environ.get(MACHETE_ENV, "1") == "0" or device.type != "cuda":
        return False
    if torch.cuda.get_device_capability(device) != (9, 0) or not _machete_ops_loaded():
        return False
    return (bits == 4 and group_size in MACHETE_GROUP_SIZES and act_dtype in (torch.float16, torch.bfloat16)
            and in_features % MACHETE_BLOCK[0] == 0 and out_features % MACHETE_BLOCK[1] == 0)


def machete_operands(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                     act_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The checkpoint's INT4 tensors as Machete's unpacked operands (before ``machete_prepack_B``).

    Args:
        qweight: int32 ``[N, K/8]`` (the checkpoint's INT4 packing: code ``j`` at bits ``4·(j % 8)``).
        scales: ``[N, K/g]``; qzeros: integer ``[N, K/g]`` (unpacked zero points).
    Returns:
        ``b_q`` int32 ``[K/8, N]`` (a column-major view of ``qweight``: GPTQ's packing along the inputs, as
        ``machete_prepack_B`` takes it), ``b_scales`` ``[K/g, N]`` and ``b_zeros = -zero · scale``
        ``[K/g, N]``, both contiguous in ``act_dtype``.
    """
    b_scales = scales.t().to(act_dtype).contiguous()
    b_zeros = (-(qzeros.t().to(act_dtype) * b_scales)).contiguous()
    return qweight.t(), b_scales, b_zeros


def machete_weights(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, bits: int, group_size: int,
                    act_dtype: torch.dtype) -> dict | None:
    """Machete's copy of a layer's INT4 weights, or ``None`` where :func:`machete_supported` says no.

    Returns ``{"machete_qweight": prepacked int32, "machete_scales": [K/g, N], "machete_zeros": [K/g, N]}``
    (scales and zero points in ``act_dtype``).
    """
    n_out, groups = scales.shape
    if not machete_supported(qweight.device, bits, group_size, groups * group_size, n_out, act_dtype):
        return None
    b_q, b_scales, b_zeros = machete_operands(qweight, scales, qzeros, act_dtype)
    prepacked = torch.ops._C.machete_prepack_B(b_q, act_dtype, _uint4_id(), act_dtype)
    return {"machete_qweight": prepacked, "machete_scales": b_scales, "machete_zeros": b_zeros}


def machete_linear(x: torch.Tensor, machete_qweight: torch.Tensor, machete_scales: torch.Tensor,
                   machete_zeros: torch.Tensor, salient_idx: torch.Tensor, salient_weight: torch.Tensor,
                   rot: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """ROSAQ linear through Machete: ``x [M, K]`` (the dtype of ``machete_scales``) to ``[M, N]``.

    ``salient_idx`` int32 ``[S]``, ``salient_weight`` ``[N, S]`` (any strides; ``S`` may be 0), ``rot`` the
    online block rotation (activation dtype) or ``None``.
    """
    from rosaq_kernels.salient import salient_addmm_

    if rot is not None:
        from rosaq_kernels.fused_linear import block_rotate

        x = block_rotate(x, rot)
    y = torch.ops._C.machete_mm(x, machete_qweight, _uint4_id(), None, machete_scales, machete_zeros, group_size,
                                None, None, None)
    if x.shape[0] < SALIENT_KERNEL_MAX_M:
        return salient_addmm_(y, x, salient_idx, salient_weight)
    if salient_idx.numel():
        y.addmm_(x.index_select(1, salient_idx), salient_weight.t().to(x.dtype))
    return y
