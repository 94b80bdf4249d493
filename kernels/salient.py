"""The salient channels' product added into an existing output, in one Triton launch.

Machete (``rosaq_kernels.machete``) computes the INT4 part of a ROSAQ linear and cannot add anything else in its
epilogue, so the fp16 salient channels are a second pass over its output::

    y += x[:, salient_idx] · salient_weightᵀ

:func:`salient_addmm_` gathers the salient columns of ``x`` inside the kernel (no ``index_select`` copy in HBM),
converts the fp16 salient weights to the activation dtype in registers (no per-call cast for bf16 models),
accumulates in fp32 and adds into ``y`` in place: one launch instead of ``index_select`` + cuBLAS ``addmm``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from rosaq_kernels.fused_linear import _interpreting, _use_pdl
from triton.language.extra.cuda import gdc_wait

#: Most salient channels gathered and multiplied at once (more are processed in chunks of this many).
MAX_BLOCK_S = 128


@triton.jit
def _gathered_dot(x_ptr, idx_ptr, w_ptr, offs_m, mask_m, offs_n, mask_n, s0, S, stride_xm, stride_xk, stride_ws,
                  stride_wn, BLOCK_S: tl.constexpr, FP32_DOT: tl.constexpr):
    """``x[offs_m, idx[s0 : s0 + BLOCK_S]] · w[s0 : s0 + BLOCK_S, offs_n]`` in fp32 (``[BLOCK_M, BLOCK_N]``)."""
    offs_s = s0 + tl.arange(0, BLOCK_S)
    mask_s = offs_s < S
    idx = tl.load(idx_ptr + offs_s, mask=mask_s, other=0)
    a = tl.load(x_ptr + offs_m[:, None] * stride_xm + idx[None, :] * stride_xk, mask=mask_m[:, None] & mask_s[None, :],
                other=0.0)
    w = tl.load(w_ptr + offs_s[:, None] * stride_ws + offs_n[None, :] * stride_wn,
                mask=mask_s[:, None] & mask_n[None, :], other=0.0)
    if FP32_DOT:
        return tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
    return tl.dot(a, w.to(a.dtype))


@triton.jit(do_not_specialize=["M"])
def _salient_addmm_kernel(
    x_ptr, idx_ptr, w_ptr, y_ptr, M, N, S,
    stride_xm, stride_xk, stride_ws, stride_wn, stride_ym, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, FP32_DOT: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """``y += x[:, idx] · w`` (``w``: the salient weights as ``[S, N]``) for one ``[BLOCK_M, BLOCK_N]`` tile.

    The tile of ``y`` is loaded first (it does not depend on the product), then the salient channels in chunks of
    ``BLOCK_S`` (one chunk up to :data:`MAX_BLOCK_S` channels). ``FP32_DOT``: multiply in fp32 (IEEE), for fp32
    activations and under Triton's interpreter, whose bf16 ``dot`` works on raw bits. ``PDL``: launched early
    (programmatic dependent launch, as ``rosaq_kernels.fused_linear``), so wait for Machete's output first.
    """
    if PDL:
        gdc_wait()
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    mask = mask_m[:, None] & mask_n[None, :]
    acc = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    for s0 in range(0, S, BLOCK_S):
        acc += _gathered_dot(x_ptr, idx_ptr, w_ptr, offs_m, mask_m, offs_n, mask_n, s0, S, stride_xm, stride_xk,
                             stride_ws, stride_wn, BLOCK_S, FP32_DOT)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def salient_addmm_(y: torch.Tensor, x: torch.Tensor, salient_idx: torch.Tensor, salient_weight: torch.Tensor,
                   config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """``y += x[:, salient_idx] · salient_weightᵀ`` in place; returns ``y``.

    Args:
        y: ``[M, N]`` fp16/bf16/fp32, any strides. x: ``[M, K]`` of ``y``'s dtype, any strides.
        salient_idx: int32 ``[S]`` (``S`` may be 0). salient_weight: ``[N, S]`` fp16 (or ``x``'s dtype), any
            strides (``prepare_weights`` stores it column-major: one row of ``salient_weightᵀ`` per salient
            channel, contiguous along the outputs).
        config: ``(BLOCK_M, BLOCK_N, num_warps)`` instead of the default by M (benchmarks; the defaults were the
            fastest of ``benchmarks/bench_machete_parts.py``'s on an H200, 2026-12-04).
    """
    M, N = y.shape
    S = salient_idx.numel()
    if x.shape[0] != M or salient_weight.shape != (N, S):
        raise ValueError(f"salient_addmm_: y {tuple(y.shape)}, x {tuple(x.shape)}, salient_weight "
                         f"{tuple(salient_weight.shape)} and {S} salient channels do not match")
    if M == 0 or S == 0:
        return y
    block_m, block_n, warps = config or ((16, 128, 4) if M <= 64 else (32, 256, 8))
    block_s = min(MAX_BLOCK_S, max(16, triton.next_power_of_2(S)))
    pdl = _use_pdl(y.device)
    _salient_addmm_kernel[(triton.cdiv(M, block_m), triton.cdiv(N, block_n))](
        x, salient_idx, salient_weight, y, M, N, S,
        x.stride(0), x.stride(1), salient_weight.stride(1), salient_weight.stride(0), y.stride(0), y.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_S=block_s,
        FP32_DOT=x.dtype == torch.float32 or _interpreting(), PDL=pdl,
        num_warps=warps, num_stages=2, launch_pdl=pdl,
    )  # fmt: skip
    return y
