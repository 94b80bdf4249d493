"""Fused ROSAQ linear in Triton: fp16 salient channels + INT4/INT3 groups in one fp32 accumulator.

Computes, for ``x [M, K]`` (fp16, bf16 or fp32)::

    x' = x · blockdiag(rot)                          (only when ``rot`` is given)
    y  = x'[:, salient_idx] · salient_weightᵀ + x' · deq(qweight)ᵀ

with ``deq(qweight)[n, k] = (code[n, k] - qzeros[n, k // g]) · scales[n, k // g]``. The definition of
correct is :func:`rosaq_kernels.reference.rosaq_linear_reference`.

Weight layout: the kernel reads the *tile-interleaved* packing of :mod:`rosaq_kernels.tile_layout`, built
once from the checkpoint's packing by :func:`prepare_weights` (in ``process_weights_after_loading``), which
also stores scales and zero points column-major (the ``BLOCK_N`` scales of one group are one contiguous
load) and casts ``rot`` to the activation dtype. Within a K tile (256 INT4 / 320 INT3 channels), packed
column ``c`` is one word holding channel ``32·j + c`` of every slice ``j`` (INT4: 8 codes, INT3: 10 codes).

Structure (in the style of Triton's matmul tutorial):

* ``_rosaq_linear_kernel``: one program computes a ``[BLOCK_M, BLOCK_N]`` tile of ``y = x' · deq(W)ᵀ``
  over a range of K tiles (split-K for small M, the whole of K for large M, grouped tile order for L2
  reuse). A K tile's words are read once (``[32, BLOCK_N]``, contiguous along the outputs) and cut into
  slices of 32 consecutive channels (slice ``j``: bits ``bits·j ..`` of every word; INT3 is a real 3-bit
  path, never a widened INT4 copy). Each slice meets a contiguous ``[BLOCK_M, 32]`` block of ``x`` and one
  scale and zero point per output (a slice lies in one quantization group: the group size is a multiple of
  32). The last tile's padding reads ``x`` as 0. Where groups do not nest in one tile but do in two (INT3's
  320 channels with g128), programs of at most 16 rows step over two tiles at a time, so that the group
  parameters are loaded once per group rather than once per slice (``tiles_per_step``).

  - ``BLOCK_M >= 16`` (tensor cores): compiled, the slice's codes come out two per instruction as in Marlin
    (``_magic_slice``: inline PTX, ``prmt`` gathers the two bytes holding slice ``j`` of two words into the
    two halves of a register, ``lop3`` masks the code and ors in the "magic number": fp16 bits
    ``0x6400 | code`` are ``1024 + code``, bf16 ``0x4300 | code`` are ``128 + code``), so ``code - zero`` is one
    exact packed subtraction. Where the code lies higher in its half and still fits the mantissa, it stays there
    (``kept_shift``: ``1024 + code · 2^k``) and the subtraction becomes one exact multiply-add by ``2^-k``;
    elsewhere a ``shr`` aligns it first. Either that operand is scaled (rounded once to the
    activation dtype) and multiplied into one fp32 accumulator, or (``LATE_SCALE``) each group's exact partial
    product is multiplied by its scales in fp32 (loaded a group ahead: Triton pipelines only loads that feed a
    product, and these scales meet the accumulator); for INT4 a group's even and odd slices go into two partial
    products, two independent tensor-core chains (``TWO_CHAINS``). The product is ``[BLOCK_M, 32] · [32, BLOCK_N]``, or
    (``SWAP``) ``deq(W) · x'ᵀ`` as ``[BLOCK_N, 32] · [32, BLOCK_M]``, which makes the dequantized weights the
    register operand of Hopper's ``wgmma`` instead of a round trip through shared memory.
  - ``BLOCK_M == 1`` (one token, decode at batch 1): no tensor cores; ``sum (code - zero) · x`` as fp32
    FMAs (``code - zero`` exact: fp32 bits ``0x4B000000 | code`` are ``2^23 + code``) into a
    ``[32, BLOCK_N]`` register tile, times the scale once per quantization group, reduced once at the end.

  The salient channels are extra tiles of 16 channels: the kernel gathers ``x[:, salient_idx]`` itself
  and multiplies it with the fp16 salient weights into the same accumulator; salient tiles are dealt
  round-robin over the split-K programs.
* ``_dequantize_kernel`` (large M, where the product is bound by the tensor cores rather than the weight
  bytes): the weight is dequantized once into a dense ``[K, N]`` matrix of the activation dtype, the
  salient weights are added into their rows, and ``torch.matmul`` (cuBLAS) does the product.
* With split-K every program writes its fp32 partial sums and counts itself in on its output tile's counter
  (one atomic); the last to arrive adds the partials in split order (deterministic) and writes ``y`` in the
  output dtype, then resets the counter: one launch, no memset, no spinning (as Marlin's locks).
* The online block rotation is a separate small Triton kernel, ``_block_rotate_kernel``
  (``x' = x · blockdiag(rot)`` on the tensor cores, written once in ``x.dtype``), run before the main
  kernel. It is not fused: the main kernel splits N over many programs, and each would have to redo
  the rotation of its x tile and re-read ``rot`` (``K·B`` elements; B/BLOCK_N times the GEMM's flops),
  which costs more than one extra pass over x (``M·K`` elements). Measured on an H100 (Llama-2-7B down_proj,
  block 128, W4, M = 1): 19.8 µs with the rotation launch, 17.0 µs without (BENCHMARKS.md). Rotating programs in the
  same launch, ahead of output programs that wait for their count, measured 1.4–1.9 µs slower than the separate
  launch (BENCHMARKS.md, 2026-12-06): they push output programs out of the first wave, and with programmatic
  dependent launch the separate launch already overlaps the GEMM's start with the rotation.
* Programmatic dependent launch (Hopper and later, :data:`PDL_ENABLED`): both kernels are launched with
  ``launch_pdl`` and wait for the previous kernel on the stream (``gdc_wait``) before their first memory access,
  so their launch and set-up overlap its tail. Neither signals its own dependents early: a kernel placed on the
  SMs early holds slots that the running kernel's programs may still need (measured slower).

CUDA-graph safety: launch configurations come from fixed tables by M bucket (no autotuning), the per-call
allocations are ``torch.empty`` (torch's caching allocator; the large-M path's dense weight too), the split-K
counters are one persistent buffer per device made by ``prepare_weights`` at load (never during capture), and nothing
reads device memory on the host. Every (M bucket, dtype, bits) variant compiles on its first eager call;
vLLM's warm-up before capture makes those calls.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from rosaq_kernels.tile_layout import SLICE, SLICES, TILE, to_kernel_layout
from triton.language.extra.cuda import gdc_wait

# Activation kinds (a constexpr of the kernels).
_ACT_FP16, _ACT_BF16, _ACT_FP32 = 0, 1, 2
_ACT_KIND = {torch.float16: _ACT_FP16, torch.bfloat16: _ACT_BF16, torch.float32: _ACT_FP32}

#: Salient channels are processed in tiles of this many (``S`` must be a multiple of it).
SALIENT_BLOCK = 16

#: In-memory dtype of the zero points. Not uint8: Triton sizes the tensor-core operand layout of the dequantized
#: weights by the narrowest type feeding it (``kWidth`` 4 for an 8-bit zero point, 2 otherwise), and with
#: ``kWidth`` 4 the activation fragments need ~100 register moves per K tile (sm_90 SASS of the M <= 16 loop:
#: 528 instructions and 128 registers with uint8 zero points, 423 and 96 with int16; BENCHMARKS.md).
KERNEL_ZERO_DTYPE = torch.int16


@triton.jit
def _codes_slice(words, j: tl.constexpr, BITS: tl.constexpr):
    """Codes of slice ``j`` of a tile (row ``c`` = channel ``32·j + c``): int32 ``[32, BLOCK_N]``.

    ``words`` are the tile's 32 words per output; slice ``j`` is bits ``BITS·j .. BITS·j + BITS - 1``. One
    shift and mask per code: no register shuffles.
    """
    return (words >> (BITS * j)) & ((1 << BITS) - 1)


# Packed-pair extraction (PTX, two codes per instruction as in Marlin). With pack = 2 every operand comes as two
# registers, one per element: ``$1``/``$2`` the two words, then ``pair_operands`` (selector ``$3``, shift ``$5``),
# the code mask ``$7`` and the magic ``$9``. ``$0`` holds the two elements' ``magic | code << kept`` as fp16x2 /
# bf16x2 (``kept_shift``). The constants reach ptxas as immediates; a shift by 0 and the ``prmt`` of the slices that
# share a byte pair are left to ptxas, which drops the one and computes the other once.
_PAIR_ASM = tl.constexpr("""{
.reg .b32 t;
prmt.b32 t, $1, $2, $3;
shr.u32 t, t, $5;
lop3.b32 $0, t, $7, $9, 0xEA;
}""")


@triton.constexpr_function
def pair_operands(bits, j):
    """``(prmt selector, right shift)`` of slice ``j``'s pair extraction (``_PAIR_ASM``).

    The code of slice ``j`` is bits ``bits·j ..`` of a word, inside bytes ``b`` and ``b + 1`` with
    ``b = min(bits·j // 8, 3)``; the selector puts those two bytes of the first word in the low half of the
    result and those of the second word in the high half, and the shift brings the code to bit 0 of each
    half (at most 7 bits: a code never crosses into the other half).
    """
    b = min(bits * j // 8, 3)
    b1 = min(b + 1, 3)  # bits·j + bits <= 30: when b = 3 the code lies in byte 3 alone
    return (b | (b1 << 4) | ((4 + b) << 8) | ((4 + b1) << 12), bits * j - 8 * b)


#: Mantissa bits of the magic-number operands, by activation kind (fp16, bf16).
_MANTISSA_BITS = (10, 7)


@triton.constexpr_function
def kept_shift(bits, j, act, compiled, keep=True):
    """Bit offset ``k`` at which slice ``j``'s code is left in each half by the pair extraction (``_PAIR_ASM``).

    After ``prmt`` the code sits ``pair_operands(bits, j)[1]`` bits up in its half. Where the code still fits in
    the magic number's mantissa there (fp16: 10 bits, bf16: 7), it stays: ``magic | code << k`` is exactly
    ``magic + code · 2^k``, ``_code_minus_zero`` undoes the ``2^k`` in its one multiply-add, and the ``shr`` is
    saved (fp16: INT4's odd slices, 8 of INT3's 10). Otherwise, with ``keep`` false, and outside the compiled
    fp16 / bf16 path ``k = 0``: the code is shifted down to bit 0 first.
    """
    shift = pair_operands(bits, j)[1]
    if not keep or (not compiled and act != 0):  # the interpreter's bf16 and fp32 operands are the integer codes
        return 0
    if act > 1 or shift + bits > _MANTISSA_BITS[act]:
        return 0
    return shift


@triton.constexpr_function
def _pow2(e):
    """``2^e`` as a Python float (a constexpr operand)."""
    return 2.0**e


@triton.jit
def _imm(like, value: tl.constexpr):
    """A constant operand of the inline PTX (folded to an immediate by ptxas)."""
    return tl.full(like.shape, value, tl.int32)


@triton.jit
def _magic_slice(words, j: tl.constexpr, BITS: tl.constexpr, ACT: tl.constexpr, COMPILED: tl.constexpr,
                 KEPT: tl.constexpr):
    """``magic + code · 2^k`` of slice ``j`` (see ``_codes_slice``; ``k = KEPT``, ``kept_shift``) in the activation
    dtype, exact.

    fp16 bits ``0x6400 | c`` are ``1024 + c``; bf16 bits ``0x4300 | c`` are ``128 + c``. Compiled, two codes
    per instruction (PTX ``prmt`` gathers the bytes holding slice ``j`` of two words into the two halves of
    one register, ``shr`` (where ``k`` is 0) and ``lop3`` align, mask and add the magic: fp16x2 ready); under the
    interpreter the same values through ``_codes_slice``. fp32 activations: the codes themselves (int32).
    """
    if ACT == 2 or (ACT == 1 and not COMPILED):
        out = _codes_slice(words, j, BITS)
    elif not COMPILED:
        out = ((_codes_slice(words, j, BITS) << KEPT) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
    else:
        if ACT == 0:
            magic: tl.constexpr = 0x64006400
        else:
            magic: tl.constexpr = 0x43004300
        mask: tl.constexpr = (((1 << BITS) - 1) << KEPT) * 0x00010001
        out = tl.inline_asm_elementwise(
            _PAIR_ASM, "=r,r,r,r,r,r,r,r,r,r,r",
            [
                words, _imm(words, pair_operands(BITS, j)[0]), _imm(words, pair_operands(BITS, j)[1] - KEPT),
                _imm(words, mask), _imm(words, magic),
            ],
            dtype=tl.float16, is_pure=True, pack=2,
        )  # fmt: skip
        if ACT == 1:  # the asm's result is a bit pattern: bf16 magic codes
            out = out.to(tl.bfloat16, bitcast=True)
    return out


@triton.jit
def _code_minus_zero(magic_codes, zero, KEPT: tl.constexpr, ACT: tl.constexpr, COMPILED: tl.constexpr):
    """``code - zero`` (exact) as a tensor-core operand, from ``_magic_slice`` (``zero`` broadcast).

    ``(magic + code) - (magic + zero)`` is exact in fp16 / bf16; with the code left ``KEPT`` bits up
    (``kept_shift``), ``(magic + code · 2^k) · 2^-k - (magic · 2^-k + zero)`` is one exact multiply-add (every
    intermediate is a small integer times a power of two). fp32 (and bf16 under Triton's interpreter, which gets
    bf16 arithmetic and dots wrong) subtracts the integer codes.
    """
    if ACT == 0 or (ACT == 1 and COMPILED):
        if ACT == 0:
            dtype: tl.constexpr = tl.float16
            magic: tl.constexpr = 1024
        else:
            dtype: tl.constexpr = tl.bfloat16
            magic: tl.constexpr = 128
        magic_zero = (zero + magic).to(dtype)  # one conversion per group, shared by its slices
        if KEPT == 0:
            return magic_codes - magic_zero
        unit = tl.full(magic_codes.shape, _pow2(-KEPT), dtype)
        return tl.fma(magic_codes, unit, (magic - (magic >> KEPT)) - magic_zero)
    else:
        return (magic_codes - zero).to(tl.float32)


@triton.jit
def _slice_minus_zero(words, j: tl.constexpr, zero, BITS: tl.constexpr, ACT: tl.constexpr, COMPILED: tl.constexpr,
                      KEEP: tl.constexpr):
    """``code - zero`` of slice ``j`` (exact, ``_code_minus_zero``'s dtype): ``_magic_slice`` then
    ``_code_minus_zero`` with the slice's ``kept_shift`` (``KEEP`` false: every code shifted to bit 0)."""
    KEPT: tl.constexpr = kept_shift(BITS, j, ACT, COMPILED, KEEP)
    return _code_minus_zero(_magic_slice(words, j, BITS, ACT, COMPILED, KEPT), zero, KEPT, ACT, COMPILED)


@triton.jit
def _quant_dot(lhs, rhs, acc, ACT: tl.constexpr, COMPILED: tl.constexpr):
    """``acc + lhs · rhs`` (fp32) for activations and dequantized weights of ``_code_minus_zero``'s dtype."""
    if ACT == 0 or (ACT == 1 and COMPILED):
        return tl.dot(lhs, rhs, acc)
    else:
        return tl.dot(lhs.to(tl.float32), rhs.to(tl.float32), acc, input_precision="ieee")


@triton.jit
def _mixed_dot(lhs, rhs, acc, ACT: tl.constexpr):
    """``acc + lhs · rhs`` (fp32) for one activation and one fp16/fp32 weight operand, by activation kind.

    fp16: fp16 operands. bf16: fp32 operands (tf32 on the tensor cores holds bf16 exactly and fp16 to 10
    bits). fp32: exact fp32 products.
    """
    if ACT == 0:
        return tl.dot(lhs.to(tl.float16), rhs.to(tl.float16), acc)
    elif ACT == 1:
        return tl.dot(lhs.to(tl.float32), rhs.to(tl.float32), acc)
    else:
        return tl.dot(lhs.to(tl.float32), rhs.to(tl.float32), acc, input_precision="ieee")


@triton.jit
def _load_tile_words(w_cols, kt, mask_n, stride_qk, SL: tl.constexpr):
    """K tile ``kt``'s words ``[32, BLOCK_N]`` (``w_cols``: ``qw_ptr + offs_n[None, :]``)."""
    rows = tl.arange(0, SL)
    return tl.load(w_cols + (kt * SL + rows)[:, None] * stride_qk, mask=mask_n[None, :], other=0)


@triton.jit
def _load_scales(sc_cols, k0, K, mask_n, stride_sg, GROUP_SIZE: tl.constexpr):
    """Scales ``[BLOCK_N]`` of the group holding channel ``k0`` (past ``K``: the last group's)."""
    return tl.load(sc_cols + (min(k0, K - 1) // GROUP_SIZE) * stride_sg, mask=mask_n, other=0.0)


@triton.jit
def _load_zeros(zp_cols, k0, K, mask_n, stride_zg, GROUP_SIZE: tl.constexpr):
    """int32 zero points ``[BLOCK_N]`` of the group holding channel ``k0`` (past ``K``: the last group's).

    The last tile's padding (codes 0, past ``K``) takes the last group's (finite) parameters and meets x read as 0.
    """
    return tl.load(zp_cols + (min(k0, K - 1) // GROUP_SIZE) * stride_zg, mask=mask_n, other=0).to(tl.int32)


@triton.jit(do_not_specialize=["M", "k_tiles", "steps_per_split", "SPLIT_K"])
def _rosaq_linear_kernel(
    x_ptr, qw_ptr, sc_ptr, zp_ptr, sidx_ptr, sw_ptr, y_ptr, part_ptr, counter_ptr,
    M, N, K, S, k_tiles, steps_per_split, SPLIT_K,
    stride_xm, stride_xk,
    stride_qk,
    stride_sn, stride_sg,
    stride_zn, stride_zg,
    stride_wn, stride_ws,
    stride_ym, stride_yn,
    stride_ps, stride_pm, stride_pn,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, ACT: tl.constexpr,
    SL: tl.constexpr, NSL: tl.constexpr, TPS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    GROUP_M: tl.constexpr, SWAP: tl.constexpr, LATE_SCALE: tl.constexpr, EVEN_K: tl.constexpr,
    SPLIT: tl.constexpr, COMPILED: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """One ``[BLOCK_M, BLOCK_N]`` tile of ``y`` over the K steps (``TPS`` K tiles each) of split ``program_id(1)``.

    Each K tile's packed words (tile-interleaved, ``[words, BLOCK_N]``) are loaded once and cut into
    slices ``[32, BLOCK_N]`` of 32 consecutive channels (``_codes_slice``); each slice meets a contiguous
    block of 32 activations per row and one scale and zero point per output. With ``BLOCK_M >= 16`` the
    dequantized slice is the second operand of a tensor-core product ``x' · deq(W)ᵀ``; with ``BLOCK_M == 1``
    (one token) the slices are fp32 FMAs into a ``[32, BLOCK_N]`` register tile, scaled once per
    quantization group and reduced once at the end.
    """
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    # Grouped ordering of the output tiles (Triton tutorial): neighbours share weight columns in L2.
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M  # not tl.cdiv: see the test module on the interpreter
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    w_cols = qw_ptr + offs_n[None, :]
    sc_cols = sc_ptr + offs_n * stride_sn
    zp_cols = zp_ptr + offs_n * stride_zn

    # The layout of rosaq_kernels.tile_layout: SL channels per slice and SL words per tile, NSL slices.
    TILE: tl.constexpr = SL * NSL
    # A step is TPS tiles (2 where that makes groups and steps nest: INT3's 320-channel tiles with g128). Slices
    # that share one scale (one quantization group) inside a step; 1 when groups and steps do not nest.
    STEP: tl.constexpr = TILE * TPS
    SPG: tl.constexpr = (GROUP_SIZE // SL) if STEP % GROUP_SIZE == 0 else (NSL * TPS if GROUP_SIZE % STEP == 0 else 1)
    # INT4 late-scaled groups of an even number of slices: even and odd slices accumulate into two partial products,
    # so two tensor-core chains run side by side. On an H100 the W4 layer got 1.6 % faster at M = 1 and 16 (96 -> 128
    # registers, 4 programs per SM, enough for every M <= 16 grid); INT3 (128 -> 168 registers, 3 programs per SM)
    # lost 2.7 % at M = 1, so it keeps one chain (BENCHMARKS.md, 2026-12-06).
    TWO_CHAINS: tl.constexpr = BITS == 4 and LATE_SCALE and SPG % 2 == 0
    # Codes left up in their halves (kept_shift) save a shift per pair: fp16 sm_90a SASS of the K loop, W4 M <= 16
    # 442 -> 410 instructions per K tile at 128 registers, W3 M = 32 / 128 852 / 837 -> 798 / 783 at 96. INT3's
    # late-scaled tiles hold eight zero-point offsets per group then (128 -> 148 registers, 4 -> 3 programs per SM,
    # too few slots for o_proj's grid): they shift (BENCHMARKS.md, 2026-12-08).
    KEEP_SHIFTS: tl.constexpr = not (BITS == 3 and LATE_SCALE)
    rows = tl.arange(0, SL)

    if BLOCK_M == 1:
        acc2 = tl.zeros((SL, BLOCK_N), dtype=tl.float32)
        x_row = x_ptr + pid_m * stride_xm
    elif SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        x_cols = x_ptr + offs_m[None, :] * stride_xm
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    if PDL:  # launched early (programmatic dependent launch): wait for the previous kernel before any memory access
        gdc_wait()

    # ---- quantized part: K steps [ks_start, ks_end) of this split ----
    ks_start = pid_k * steps_per_split
    ks_end = min(ks_start + steps_per_split, (k_tiles + TPS - 1) // TPS)
    if LATE_SCALE:
        # Scales that only meet the accumulator are not pipelined by Triton (only loads feeding a dot are): load
        # each group's one group ahead, in registers, so the load's latency hides behind a group of products (a
        # program's last prefetch reads a group it does not use, clamped to the last one: 2 bytes per output).
        scale_next = _load_scales(sc_cols, ks_start * STEP, K, mask_n, stride_sg, GROUP_SIZE)
    for ks in range(ks_start, ks_end):
        for j in tl.static_range(TPS * NSL):  # slice j of the step: slice j % NSL of tile kt
            kt = ks * TPS + j // NSL
            if j % NSL == 0:
                if TPS == 1:
                    words = _load_tile_words(w_cols, kt, mask_n, stride_qk, SL)
                else:  # a tile past K (the second of a last step) re-reads the last tile; x is 0 there
                    words = _load_tile_words(w_cols, tl.minimum(kt, k_tiles - 1), mask_n, stride_qk, SL)
            k0 = kt * TILE + (j % NSL) * SL  # first channel of the slice; the whole slice is in one group
            k_ok = (k0 + rows < K) | EVEN_K  # (EVEN_K: no step is padded, loads stay vectorized)
            if j % SPG == 0:
                zero = _load_zeros(zp_cols, k0, K, mask_n, stride_zg, GROUP_SIZE)
                if LATE_SCALE:
                    scale = scale_next
                    scale_next = _load_scales(sc_cols, k0 + SPG * SL, K, mask_n, stride_sg, GROUP_SIZE)
                else:
                    scale = _load_scales(sc_cols, k0, K, mask_n, stride_sg, GROUP_SIZE)
            if BLOCK_M == 1:
                # One token: sum (c - z) · x in fp32 (c + 2^23 is the fp32 with bits 0x4B000000 | c, so c - z
                # is one exact subtraction), times the scale once per group.
                codes = _codes_slice(words, j % NSL, BITS)
                xk = tl.load(x_row + (k0 + rows) * stride_xk, mask=k0 + rows < K, other=0.0)  # pid_m < M
                if j % SPG == 0:
                    zf = (zero | 0x4B000000).to(tl.float32, bitcast=True)
                    part = tl.zeros((SL, BLOCK_N), dtype=tl.float32)
                w = (codes | 0x4B000000).to(tl.float32, bitcast=True) - zf[None, :]
                part += w * xk.to(tl.float32)[:, None]
                if (j + 1) % SPG == 0:
                    acc2 += part * scale.to(tl.float32)[None, :]
            else:
                # Tensor cores: x' · deq(W)ᵀ as [BLOCK_M, BLOCK_N] tiles, or (SWAP) deq(W) · x'ᵀ as
                # [BLOCK_N, BLOCK_M] tiles, which lets the weights be the register operand of Hopper's wgmma.
                w = _slice_minus_zero(words, j % NSL, zero[None, :], BITS, ACT, COMPILED, KEEP_SHIFTS)
                if not LATE_SCALE:  # scale the operand (rounded once to its dtype, as in Marlin)
                    w = w * scale[None, :].to(w.dtype)
                elif j % SPG == 0:  # scale the group's exact partial product, once per group
                    part = tl.zeros(acc.shape, dtype=tl.float32)
                    if TWO_CHAINS:  # odd slices into a second partial: two independent product chains
                        part_odd = tl.zeros(acc.shape, dtype=tl.float32)
                if SWAP:
                    a_mask = k_ok[:, None] & mask_m[None, :]
                    a = tl.load(x_cols + (k0 + rows)[:, None] * stride_xk, mask=a_mask, other=0.0)
                    lhs, rhs = tl.trans(w), a
                    scale_acc = scale.to(tl.float32)[:, None]
                else:
                    a_mask = mask_m[:, None] & k_ok[None, :]
                    a = tl.load(x_rows + (k0 + rows)[None, :] * stride_xk, mask=a_mask, other=0.0)
                    lhs, rhs = a, w
                    scale_acc = scale.to(tl.float32)[None, :]
                if LATE_SCALE:
                    if TWO_CHAINS and j % 2 == 1:
                        part_odd = _quant_dot(lhs, rhs, part_odd, ACT, COMPILED)
                    else:
                        part = _quant_dot(lhs, rhs, part, ACT, COMPILED)
                    if (j + 1) % SPG == 0:
                        if TWO_CHAINS:
                            part += part_odd
                        acc += part * scale_acc
                else:
                    acc = _quant_dot(lhs, rhs, acc, ACT, COMPILED)

    # ---- salient part: tiles of BLOCK_S gathered channels, dealt round-robin over the splits ----
    offs_s = tl.arange(0, BLOCK_S)
    if BLOCK_M == 1:
        acc_s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for s0 in range(pid_k * BLOCK_S, S, SPLIT_K * BLOCK_S):
        sidx = tl.load(sidx_ptr + s0 + offs_s).to(tl.int64)
        ws = tl.load(
            sw_ptr + offs_n[None, :] * stride_wn + (s0 + offs_s)[:, None] * stride_ws,
            mask=mask_n[None, :],
            other=0.0,
        )  # [BLOCK_S, BLOCK_N]
        if BLOCK_M == 1:
            xs = tl.load(x_row + sidx * stride_xk)
            acc_s += tl.sum(ws.to(tl.float32) * xs.to(tl.float32)[:, None], axis=0)
        elif SWAP:
            a = tl.load(x_cols + sidx[:, None] * stride_xk, mask=mask_m[None, :], other=0.0)
            acc = _mixed_dot(tl.trans(ws), a, acc, ACT)
        else:
            a = tl.load(x_rows + sidx[None, :] * stride_xk, mask=mask_m[:, None], other=0.0)
            acc = _mixed_dot(a, ws, acc, ACT)
    if BLOCK_M == 1:
        acc = (tl.sum(acc2, axis=0) + acc_s)[None, :]

    if SWAP:
        part_offs = offs_n[:, None] * stride_pn + offs_m[None, :] * stride_pm
        y_offs = offs_n[:, None] * stride_yn + offs_m[None, :] * stride_ym
        out_mask = mask_n[:, None] & mask_m[None, :]
    else:
        part_offs = offs_m[:, None] * stride_pm + offs_n[None, :] * stride_pn
        y_offs = offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
        out_mask = mask_m[:, None] & mask_n[None, :]
    if not SPLIT:
        tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)
    else:
        # Split-K, reduced in this launch: every split stores its fp32 partial sums, then counts itself in on
        # the tile's counter; the last to arrive adds the partials in split order (deterministic) and writes y.
        tl.store(part_ptr + pid_k * stride_ps + part_offs, acc, mask=out_mask)
        tl.debug_barrier()  # all threads' partials are written before the (gpu-scope, release) count
        arrived = tl.atomic_add(counter_ptr + pid, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            total = tl.zeros(acc.shape, dtype=tl.float32)
            for s in range(SPLIT_K):  # read from L2 (.cg): the other SMs' partials are there
                total += tl.load(part_ptr + s * stride_ps + part_offs, mask=out_mask, other=0.0, cache_modifier=".cg")
            tl.store(y_ptr + y_offs, total.to(y_ptr.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(counter_ptr + pid, 0, sem="relaxed", scope="gpu")  # ready for the next launch


@triton.jit(do_not_specialize=["M"])
def _block_rotate_kernel(
    x_ptr, rot_ptr, out_ptr, M,
    stride_xm, stride_xk, stride_rb, stride_ri, stride_rj, stride_om, stride_ok,
    B: tl.constexpr, ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    """``out[:, b*B + j] = sum_i x[:, b*B + i] · rot[b, i, j]`` for one (M tile, block b, J tile)."""
    if PDL:  # launched early (programmatic dependent launch): wait for the previous kernel before any memory access
        gdc_wait()
    pid_m = tl.program_id(0)
    blk = tl.program_id(1)
    pid_j = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_i = tl.arange(0, BLOCK_I)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    acc = tl.zeros((BLOCK_M, BLOCK_J), dtype=tl.float32)
    for i0 in range(0, B, BLOCK_I):
        a = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + (blk * B + i0 + offs_i)[None, :] * stride_xk,
            mask=mask_m[:, None],
            other=0.0,
        )
        r = tl.load(rot_ptr + blk * stride_rb + (i0 + offs_i)[:, None] * stride_ri + offs_j[None, :] * stride_rj)
        acc = _mixed_dot(a, r, acc, ACT)
    tl.store(
        out_ptr + offs_m[:, None] * stride_om + (blk * B + offs_j)[None, :] * stride_ok,
        acc.to(out_ptr.dtype.element_ty),
        mask=mask_m[:, None],
    )


@triton.jit
def _dequantize_kernel(
    qw_ptr, sc_ptr, zp_ptr, out_ptr, N, K,
    stride_qk, stride_sn, stride_sg, stride_zn, stride_zg, stride_ok, stride_on,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, ACT: tl.constexpr,
    SL: tl.constexpr, NSL: tl.constexpr, BLOCK_N: tl.constexpr, COMPILED: tl.constexpr,
):  # fmt: skip
    """``out[k, n] = deq(W)[n, k]`` (``[K, N]``, the activation dtype) for one K tile × ``BLOCK_N`` outputs.

    The same slice extraction as ``_rosaq_linear_kernel``; ``code - zero`` exact, times the scale in fp32,
    rounded once to the output dtype.
    """
    kt = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = tl.arange(0, SL)
    words = _load_tile_words(qw_ptr + offs_n[None, :], kt, mask_n, stride_qk, SL)
    sc_cols = sc_ptr + offs_n * stride_sn
    zp_cols = zp_ptr + offs_n * stride_zn
    for j in tl.static_range(NSL):
        k0 = kt * SL * NSL + j * SL
        scale = _load_scales(sc_cols, k0, K, mask_n, stride_sg, GROUP_SIZE)
        zero = _load_zeros(zp_cols, k0, K, mask_n, stride_zg, GROUP_SIZE)
        cz = _slice_minus_zero(words, j, zero[None, :], BITS, ACT, COMPILED, True)
        w = cz.to(tl.float32) * scale.to(tl.float32)[None, :]
        tl.store(
            out_ptr + (k0 + rows)[:, None] * stride_ok + offs_n[None, :] * stride_on,
            w.to(out_ptr.dtype.element_ty),
            mask=(k0 + rows < K)[:, None] & mask_n[None, :],
        )


# --------------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------------

# Fixed launch configurations by M bucket, per bit width:
#   (max M, BLOCK_M, BLOCK_N, num_warps, num_stages, split-K waves, swap, late scale)
# BLOCK_N is the outputs of a tile, BLOCK_M the batch: 1 selects the one-token (FMA) path, 16 and up the
# tensor-core path, 0 the large-M path: dequantize the weight once into a dense ``[K, N]`` matrix (a Triton kernel
# of BLOCK_N outputs per program, the remaining fields unused) and multiply with torch.matmul (cuBLAS), as vLLM's
# AWQ method does from 256 tokens on. The K tile is the layout's (rosaq_kernels.tile_layout.TILE: 256 channels for
# INT4, 320 for INT3). With waves > 0 the K loop is split so that about ``waves × #SMs`` programs run (capped so
# that the fp32 partial sums stay small next to the weight); 0 means no split. swap = 1 computes ``deq(W) · x'ᵀ``
# tiles (the weights are the first, register, operand of the product); late scale = 1 multiplies each
# group's exact partial product by its scales instead of scaling every dequantized weight. Fixed tables, no
# autotuning (which would time kernels during CUDA-graph capture). Rows from benchmarks/bench_kernels.py
# --sweep on the H100 (BENCHMARKS.md): M = 1, 16, 64, 256, 1024, then --sweep-ms 32,128 for those two rows; the
# M <= 64 rows again with --sweep-ms 1,16,32,64 after the split-K reduction moved into the kernel; the INT3 rows up
# to M = 128 again after its layout became 10 codes per word (benchmarks/ab_configs.py, BENCHMARKS.md), the
# M <= 16 rows once more with two-tile steps, the M <= 128 rows after the zero points became int16 in memory
# (KERNEL_ZERO_DTYPE: cheaper non-swapped tiles), and the INT3 M <= 16 and M = 128 rows with 2 stages after the
# scales of late-scaled tiles were prefetched a group ahead.
_CONFIGS = {
    4: (
        (1, 16, 64, 4, 3, 4, 0, 1),
        (16, 16, 64, 4, 3, 4, 0, 1),
        (32, 32, 64, 4, 3, 4, 0, 0),
        (64, 32, 64, 4, 3, 4, 0, 0),
        (128, 64, 64, 4, 3, 2, 1, 0),
        (256, 0, 128, 4, 1, 0, 0, 0),
        (1 << 62, 0, 64, 4, 1, 0, 0, 0),
    ),
    3: (
        (1, 16, 64, 4, 2, 4, 0, 1),
        (16, 16, 64, 4, 2, 4, 0, 1),
        (32, 32, 64, 4, 3, 2, 0, 0),
        (64, 32, 64, 4, 3, 4, 0, 0),
        (128, 32, 64, 4, 2, 4, 0, 0),
        (256, 0, 128, 4, 1, 0, 0, 0),
        (1 << 62, 0, 64, 4, 1, 0, 0, 0),
    ),
}
_GROUP_M = 8


def set_config_table(bits: int, table) -> None:
    """Replace the M-bucket table of one bit width (benchmarks and tuning)."""
    _CONFIGS[bits] = tuple(tuple(int(v) for v in row) for row in table)


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _device_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 132  # interpreter / CPU: pretend an H100, so CPU tests exercise split-K


def tiles_per_step(bits: int, group_size: int, block_m: int) -> int:
    """K tiles the kernel processes per loop step: 2 where groups do not nest in one tile but do in two.

    INT3's 320-channel tile and the usual g128: one tile would reload the group parameters at every 32-channel
    slice; two tiles (640 channels, 5 groups) keep them static, 4 slices per group. Only for ``block_m <= 16``:
    with larger row tiles the doubled activation tile costs pipeline stages (measured slower, BENCHMARKS.md).
    """
    if block_m > 16:
        return 1

    def nests(span: int) -> bool:
        return span % group_size == 0 or group_size % span == 0

    return 2 if not nests(TILE[bits]) and nests(2 * TILE[bits]) else 1


def _pick_config(M: int, N: int, K: int, bits: int, group_size: int, device: torch.device, config=None):
    """``(BLOCK_M, BLOCK_N, num_warps, num_stages, swap, late scale, k_tiles, tiles per step, steps per split,
    split)``."""
    if config is None:
        config = next(row[1:] for row in _CONFIGS[bits] if M <= row[0])
    bm, bn, warps, stages, waves, swap, late = config
    k_tiles = triton.cdiv(K, TILE[bits])
    tps = tiles_per_step(bits, group_size, bm)
    k_steps = triton.cdiv(k_tiles, tps)
    split = 1
    if waves > 0:
        tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
        split = max(1, min(k_steps, waves * _device_sms(device) // tiles))
        # Partial sums (fp32, written and read back) must stay small next to the packed weight.
        weight_bytes = N * K * bits // 8
        split = max(1, min(split, weight_bytes // (8 * 4 * M * N)))
    steps_per_split = triton.cdiv(k_steps, split)
    split = triton.cdiv(k_steps, steps_per_split)  # no empty splits
    return bm, bn, warps, stages, bool(swap), bool(late), k_tiles, tps, steps_per_split, split


def _linear_constexprs(
    bits: int, group_size: int, act_dtype: torch.dtype, K: int, bm: int, bn: int, swap: bool, late: bool, tps: int,
    split: int, pdl: bool,
) -> dict[str, int | bool]:
    """The ``tl.constexpr`` arguments of ``_rosaq_linear_kernel`` for a config of :func:`_pick_config`."""
    return dict(
        BITS=bits, GROUP_SIZE=group_size, ACT=_ACT_KIND[act_dtype], SL=SLICE, NSL=SLICES[bits], TPS=tps,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_S=SALIENT_BLOCK, GROUP_M=_GROUP_M, SWAP=swap and bm > 1,
        LATE_SCALE=late and bm > 1, EVEN_K=K % (TILE[bits] * tps) == 0, SPLIT=split > 1, COMPILED=not _interpreting(),
        PDL=pdl,
    )  # fmt: skip


#: Environment variable: ``0`` launches the kernels without programmatic dependent launch.
PDL_ENV = "ROSAQ_PDL"
#: Launch the kernels with programmatic dependent launch where the GPU has it (Hopper and later); ``ROSAQ_PDL=0``
#: turns it off, and benchmarks toggle it for A/B runs.
PDL_ENABLED = os.environ.get(PDL_ENV, "1") != "0"


@functools.cache
def _has_pdl(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def _use_pdl(device: torch.device) -> bool:
    """Programmatic dependent launch (sm_90+): a kernel's programs may be placed on the SMs before the previous
    kernel on the stream has finished; they wait for it (``gdc_wait``) before touching memory."""
    if not PDL_ENABLED or device.type != "cuda" or _interpreting():
        return False
    return _has_pdl(device.index if device.index is not None else torch.cuda.current_device())


#: Per-device int32 counters of the split-K reduction, one per output tile, all 0 between launches. Replaced
#: buffers stay alive in ``_RETIRED_COUNTERS``: CUDA graphs captured earlier still point at them.
_COUNTERS: dict[torch.device, torch.Tensor] = {}
_RETIRED_COUNTERS: list[torch.Tensor] = []


def _tile_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """At least ``tiles`` zeroed int32 counters on ``device``, kept for the life of the process.

    The kernel's last split of a tile resets its counter, so the buffer is zero again after every launch and
    is shared by all linears of a stream (a kernel touches memory only after the previous one on its stream has
    finished, with programmatic dependent launch too: it waits first). Allocated by ``prepare_weights``
    (at load, before CUDA-graph capture) or on first use, grown if ever needed, never freed.
    """
    counters = _COUNTERS.get(device)
    if counters is None or counters.numel() < tiles:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "rosaq: split-K counters must be allocated before CUDA-graph capture; run the layer eagerly once "
                "at this batch size first (vLLM's warm-up does)"
            )
        if counters is not None:
            _RETIRED_COUNTERS.append(counters)
        counters = torch.zeros(max(tiles, 4096), dtype=torch.int32, device=device)
        _COUNTERS[device] = counters
    return counters


def _rot_block(B: int) -> int:
    for b in (64, 32, 16):
        if B % b == 0:
            return b
    raise ValueError(f"rotation block {B} must be a multiple of 16")


def block_rotate(x: torch.Tensor, rot: torch.Tensor, config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """``x [M, nb*B] · blockdiag(rot [nb, B, B])`` in ``x.dtype`` (fp32 accumulation), one Triton launch.

    ``config``: ``(BLOCK_M, BLOCK_I, BLOCK_J)`` instead of the default (benchmarks): rows, block rows per product and
    block columns per program.
    """
    M, K = x.shape
    nb, B, _ = rot.shape
    if nb * B != K:
        raise ValueError(f"rot {tuple(rot.shape)} does not cover K={K}")
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    bm, bi, bj = config or (16 if M <= 16 else 64, _rot_block(B), _rot_block(B))
    if B % bi or B % bj:
        raise ValueError(f"rotation tiles {bi} x {bj} do not divide the block {B}")
    grid = (triton.cdiv(M, bm), nb, B // bj)
    pdl = _use_pdl(x.device)
    _block_rotate_kernel[grid](
        x, rot, out, M,
        x.stride(0), x.stride(1), rot.stride(0), rot.stride(1), rot.stride(2), out.stride(0), out.stride(1),
        B=B, ACT=_ACT_KIND[x.dtype], BLOCK_M=bm, BLOCK_I=bi, BLOCK_J=bj, PDL=pdl,
        num_warps=4, num_stages=2, launch_pdl=pdl,
    )  # fmt: skip
    return out


def rosaq_fused_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor,
    salient_idx: torch.Tensor,
    salient_weight: torch.Tensor,
    rot: torch.Tensor | None,
    bits: int,
    group_size: int,
    out: torch.Tensor | None = None,
    config: tuple[int, ...] | None = None,
    kernel_layout: bool = False,
) -> torch.Tensor:
    """The fused ROSAQ linear; same arguments and result as ``rosaq_linear_reference``.

    ``qweight`` is in the checkpoint's packing, or (``kernel_layout=True``) in the tile-interleaved layout
    of :func:`prepare_weights`; the checkpoint's packing is converted on every call (tests and one-off
    calls; serving prepares once). Other tensors: any strides. ``out`` is an optional ``[M, N]`` buffer of
    ``x.dtype`` to write into. ``config`` overrides the M-bucket table (``(BLOCK_M, BLOCK_N, num_warps,
    num_stages, split-K waves, swap, late scale)``; for benchmarks and tuning).
    """
    if x.dtype not in _ACT_KIND:
        raise TypeError(f"activations must be fp16, bf16 or fp32, got {x.dtype}")
    if bits not in (3, 4):
        raise ValueError(f"bits must be 3 or 4, got {bits}")
    if group_size % SLICE:
        raise ValueError(f"group_size={group_size} is not a multiple of {SLICE}")
    M, K = x.shape
    S = salient_idx.numel()
    if S % SALIENT_BLOCK:
        raise ValueError(f"number of salient channels must be a multiple of {SALIENT_BLOCK}, got {S}")
    if K % SLICE or scales.shape[1] * group_size != K:
        raise ValueError(f"K={K} must be a multiple of {SLICE} and match scales {tuple(scales.shape)}")
    if not kernel_layout:
        if qweight.shape[1] * 32 != K * bits:
            raise ValueError(f"qweight {tuple(qweight.shape)} does not hold K={K} INT{bits} codes")
        qweight = to_kernel_layout(qweight, bits, K)
        qzeros = qzeros.to(KERNEL_ZERO_DTYPE)
    elif qweight.shape[0] != triton.cdiv(K, TILE[bits]) * SLICE or qweight.stride(1) != 1:
        raise ValueError(f"qweight {tuple(qweight.shape)} is not the kernel layout of K={K} INT{bits} codes")
    N = qweight.shape[1]
    if out is None:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return out
    if rot is not None:
        x = block_rotate(x, rot)
    if S == 0:  # never dereferenced (the salient loop is empty); any valid pointers of the right dtypes
        salient_idx, salient_weight = qweight, scales
        sw_strides = (0, 0)
    else:
        sw_strides = (salient_weight.stride(0), salient_weight.stride(1))
    bm, bn, warps, stages, swap, late, k_tiles, tps, steps, split = _pick_config(
        M, N, K, bits, group_size, x.device, config
    )
    if bm == 0:  # large M: dequantize once, then the dense matmul (cuBLAS on the GPU)
        w_t = torch.empty((K, N), dtype=x.dtype, device=x.device)
        _dequantize_kernel[(k_tiles, triton.cdiv(N, bn))](
            qweight, scales, qzeros, w_t, N, K,
            qweight.stride(0), scales.stride(0), scales.stride(1), qzeros.stride(0), qzeros.stride(1),
            w_t.stride(0), w_t.stride(1),
            BITS=bits, GROUP_SIZE=group_size, ACT=_ACT_KIND[x.dtype], SL=SLICE, NSL=SLICES[bits],
            BLOCK_N=bn, COMPILED=not _interpreting(), num_warps=warps,
        )  # fmt: skip
        if S:
            w_t.index_add_(0, salient_idx.long(), salient_weight.t().to(x.dtype))
        return torch.matmul(x, w_t, out=out)
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    pdl = _use_pdl(x.device)
    if split == 1:  # not used by the kernel (SPLIT=False)
        partials, counters = out, qweight
    else:
        partials = torch.empty((split, M, N), dtype=torch.float32, device=x.device)
        counters = _tile_counters(x.device, tiles)
    _rosaq_linear_kernel[(tiles, split)](
        x, qweight, scales, qzeros, salient_idx, salient_weight, out, partials, counters,
        M, N, K, S, k_tiles, steps, split,
        x.stride(0), x.stride(1),
        qweight.stride(0),
        scales.stride(0), scales.stride(1),
        qzeros.stride(0), qzeros.stride(1),
        sw_strides[0], sw_strides[1],
        out.stride(0), out.stride(1),
        *((0, 0, 0) if split == 1 else partials.stride()),
        **_linear_constexprs(bits, group_size, x.dtype, K, bm, bn, swap, late, tps, split, pdl),
        num_warps=warps, num_stages=stages, launch_pdl=pdl,
    )  # fmt: skip
    return out


def _column_major(t: torch.Tensor) -> torch.Tensor:
    """The same logical 2-D tensor, stored transposed (stride 1 along dim 0)."""
    return t.t().contiguous().t()


def prepare_weights(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor,
    salient_idx: torch.Tensor,
    salient_weight: torch.Tensor,
    rot: torch.Tensor | None,
    bits: int,
    group_size: int,
    rot_dtype: torch.dtype = torch.float16,
) -> dict:
    """Repack a checkpoint's tensors for the kernel (call once, in ``process_weights_after_loading``).

    Returns a dict of the tensors of a ROSAQ linear: ``qweight`` in the tile-interleaved layout
    (:func:`rosaq_kernels.tile_layout.to_kernel_layout`, int32 ``[ceil(K / TILE) · 32, N]``),
    ``scales`` (fp16), ``qzeros`` (int16, :data:`KERNEL_ZERO_DTYPE`) and ``salient_weight`` (fp16) stored
    column-major (``[K/g, N]`` and ``[S, N]`` in memory: contiguous along the outputs of a tile), ``salient_idx``
    int32, ``rot`` in ``rot_dtype``. Use with :func:`fused_linear`, or ``torch.ops.rosaq.linear`` with
    ``kernel_layout=True``.
    """
    in_features = scales.shape[1] * group_size
    if qweight.is_cuda:  # the split-K counters exist before any CUDA-graph capture
        _tile_counters(qweight.device, 0)
    return {
        "qweight": to_kernel_layout(qweight, bits, in_features),
        "scales": _column_major(scales.to(torch.float16)),
        "qzeros": _column_major(qzeros.to(KERNEL_ZERO_DTYPE)),
        "salient_idx": salient_idx.to(torch.int32).contiguous(),
        "salient_weight": _column_major(salient_weight.to(torch.float16)),
        "rot": None if rot is None else rot.to(rot_dtype).contiguous(),
    }


def fused_linear(
    x: torch.Tensor,
    prepared: dict,
    bits: int,
    group_size: int,
    out: torch.Tensor | None = None,
    config: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """:func:`rosaq_fused_linear` on the output of :func:`prepare_weights`."""
    return rosaq_fused_linear(
        x,
        prepared["qweight"],
        prepared["scales"],
        prepared["qzeros"],
        prepared["salient_idx"],
        prepared["salient_weight"],
        prepared["rot"],
        bits,
        group_size,
        out=out,
        config=config,
        kernel_layout=True,
    )
