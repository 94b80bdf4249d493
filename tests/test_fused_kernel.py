"""The fused Triton ROSAQ linear against the torch reference, on CPU through Triton's interpreter.

``TRITON_INTERPRET=1`` must be set before triton is first imported (triton decides at import time
whether its own library functions, ``tl.zeros`` and the like, are interpreted). This module sets it;
when something imported triton earlier in the same process (a conftest importing transformers does),
the cases here skip and ``test_cases_in_fresh_interpreter_process`` runs this file again in a
subprocess with the variable set from the start (and without the conftest). So it runs in CI without
a GPU either way. Every case draws fresh random weights, codes, zero points, salient channels and
activations (never zeros), writes into an output buffer poisoned with NaN, and compares with
``rosaq_linear_reference`` fed float64 inputs (it computes in float32, far below the tolerances here)
by ‖y − ref‖ / ‖ref‖.

Known limit of the interpreter (triton 3.9): bf16 arithmetic and bf16 ``tl.dot`` are computed on the raw
bits, and fp32 → bf16 conversion truncates. The kernel therefore runs its bf16 weight tiles in fp32
under the interpreter (the native bf16 path is checked on the GPU by ``benchmarks/check_kernels_gpu.py``),
and the bf16 tolerance allows for truncated rounding.
"""

import os
import subprocess
import sys
from pathlib import Path

_LATE = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

try:
    import rosaq_kernels.ops  # noqa: F401  (registers torch.ops.rosaq.linear)
    import triton  # noqa: F401
    from rosaq_kernels.fused_linear import (  # noqa: E402
        fused_linear,
        prepare_weights,
        rosaq_fused_linear,
    )
    from rosaq_kernels.tile_layout import SLICE, TILE, from_kernel_layout, to_kernel_layout
except Exception as exc:  # pragma: no cover - depends on the environment
    pytest.skip(f"triton (interpreter) unavailable: {exc!r}", allow_module_level=True)

from rosaq_kernels.packing import pack  # noqa: E402
from rosaq_kernels.reference import rosaq_linear_reference  # noqa: E402

late = pytest.mark.skipif(
    _LATE, reason="triton was imported before TRITON_INTERPRET=1 could be set; run in a fresh process below"
)


@pytest.mark.skipif(not _LATE, reason="this process interprets already; the cases run directly")
def test_cases_in_fresh_interpreter_process():
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-x",
        "--noconftest",
        "-p",
        "no:cacheprovider",
        str(Path(__file__)),
    ]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]


TOL = {torch.float16: 2e-3, torch.bfloat16: 1.2e-2, torch.float32: 1e-5}


def _random_layer(gen, M, K, N, bits, S, B, dtype, group_size=128):
    x = torch.randn(M, K, generator=gen).to(dtype)
    codes = torch.randint(0, 2**bits, (N, K), generator=gen)
    qweight = pack(codes, bits)
    scales = (torch.rand(N, K // group_size, generator=gen) * 0.02 + 0.005).half()
    qzeros = torch.randint(0, 2**bits, (N, K // group_size), generator=gen, dtype=torch.uint8)
    salient_idx = torch.randperm(K, generator=gen)[:S].to(torch.int32)
    salient_weight = (torch.randn(N, S, generator=gen) * 0.1).half()
    rot = None
    if B:
        rot = torch.linalg.qr(torch.randn(K // B, B, B, generator=gen, dtype=torch.float64))[0].float()
    return x, qweight, scales, qzeros, salient_idx, salient_weight, rot


def _reference64(x, qweight, scales, qzeros, salient_idx, salient_weight, rot, bits, group_size):
    return rosaq_linear_reference(
        x.double(),
        qweight,
        scales.double(),
        qzeros,
        salient_idx,
        salient_weight.double(),
        None if rot is None else rot.double(),
        bits,
        group_size,
    )


def _check(y, ref, dtype):
    assert y.dtype == dtype
    assert not torch.isnan(y).any(), "NaN in the output (unwritten element or bad arithmetic)"
    assert torch.isfinite(y).all()
    err = ((y.double() - ref).norm() / ref.norm()).item()
    assert err < TOL[dtype], f"relative error {err:.2e} over {TOL[dtype]:.0e}"


# (M, K, N, bits, S, rot block, dtype): every bits × dtype × rotation combination, with M, N and S
# cycling over {1, 5, 33}, {64, 96} and {0, 16, 32}.
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_CASES = []
for _i, (_bits, _dt, _B) in enumerate((b, d, r) for b in (4, 3) for d in _DTYPES for r in (0, 64, 256)):
    _CASES.append(((1, 5, 33)[_i % 3], 256, (64, 96)[_i % 2], _bits, (0, 16, 32)[(_i // 3 + _i) % 3], _B, _dt))
# Split-K with an uneven last split and salient tiles dealt over the splits; the large-M bucket.
_CASES += [
    (5, 1024, 64, 4, 32, 0, torch.float16),
    (5, 1024, 96, 3, 48, 64, torch.bfloat16),
    (2, 512, 64, 3, 16, 0, torch.float32),
    (300, 256, 96, 4, 16, 64, torch.float16),
    # K not a multiple of the K tile (a masked last tile), as Llama-2-7B's down_proj (11008 = 43 × 256).
    (1, 384, 64, 3, 16, 0, torch.float16),
    (17, 384, 64, 3, 0, 0, torch.bfloat16),
    (1, 640, 96, 4, 32, 128, torch.float32),
    # Many salient tiles per split (S = 304: 19 tiles of 16 over 2 splits): the one-token rows, the 32-row tiles and
    # the swapped 64-row tiles.
    (1, 512, 64, 4, 304, 0, torch.float16),
    (33, 512, 96, 3, 208, 0, torch.bfloat16),
    (100, 512, 64, 4, 208, 0, torch.float32),
]


@late
@pytest.mark.parametrize("M,K,N,bits,S,B,dtype", _CASES)
def test_fused_matches_reference(M, K, N, bits, S, B, dtype):
    gen = torch.Generator().manual_seed(hash((M, K, N, bits, S, B, str(dtype))) % 2**31)
    args = _random_layer(gen, M, K, N, bits, S, B, dtype)
    out = torch.full((M, N), float("nan"), dtype=dtype)
    y = rosaq_fused_linear(*args, bits, 128, out=out)
    assert y.data_ptr() == out.data_ptr()
    _check(y, _reference64(*args, bits, 128), dtype)


@late
@pytest.mark.parametrize(
    "bits,group_size,K",
    # Groups inside a tile (several slices per scale), one slice per group, groups spanning whole tiles,
    # and group sizes that neither divide nor are divided by the tile (one scale load per slice).
    [(4, 64, 256), (3, 32, 256), (4, 32, 256), (3, 128, 256), (4, 512, 1024), (3, 512, 1024), (4, 96, 768),
     (3, 160, 640), (3, 128, 640), (3, 640, 1280)],
)
def test_prepared_layout_and_group_sizes(bits, group_size, K):
    gen = torch.Generator().manual_seed(1000 + bits * 100 + group_size)
    M, N, S = 3, 64, 16
    x, qweight, scales, qzeros, sidx, sw, rot = _random_layer(gen, M, K, N, bits, S, 64, torch.float16, group_size)
    prepared = prepare_weights(qweight, scales, qzeros, sidx, sw, rot, bits=bits, group_size=group_size)
    assert prepared["qweight"].shape == (-(-K // TILE[bits]) * SLICE, N)
    assert torch.equal(from_kernel_layout(prepared["qweight"], bits, K), qweight)
    assert torch.equal(prepared["qzeros"], qzeros)
    assert torch.equal(prepared["scales"], scales) and prepared["scales"].stride() == (1, N)
    assert torch.equal(prepared["salient_weight"], sw) and prepared["salient_weight"].stride() == (1, N)
    assert prepared["rot"].dtype == torch.float16
    ref = _reference64(
        x, qweight, scales, qzeros, sidx, sw, prepared["rot"].float(), bits, group_size
    )  # the prepared (fp16-rounded) rotation is the weight now
    out = torch.full((M, N), float("nan"), dtype=torch.float16)
    _check(fused_linear(x, prepared, bits, group_size, out=out), ref, torch.float16)
    # The one-token path with this group size too.
    out1 = torch.full((1, N), float("nan"), dtype=torch.float16)
    _check(fused_linear(x[:1], prepared, bits, group_size, out=out1), ref[:1], torch.float16)
    # The op of the prepared layout (on CPU: the reference after undoing the tile interleaving).
    args = [prepared[k] for k in ("qweight", "scales", "qzeros", "salient_idx", "salient_weight", "rot")]
    y = torch.ops.rosaq.linear(x, *args, bits, group_size, True)
    _check(y, ref, torch.float16)


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("K", [256, 384, 1152, 11008])
def test_kernel_layout_roundtrip_and_slices(bits, K):
    """Packed column c of tile t holds channel t·TILE + 32·j + c in slice j; the layout round-trips."""
    gen = torch.Generator().manual_seed(K + bits)
    codes = torch.randint(0, 2**bits, (5, K), generator=gen)
    packed = pack(codes, bits)
    kw = to_kernel_layout(packed, bits, K)
    assert kw.dtype == torch.int32 and kw.shape == (-(-K // TILE[bits]) * SLICE, 5) and kw.stride(1) == 1
    assert torch.equal(from_kernel_layout(kw, bits, K), packed)
    words = (kw.t().long() & 0xFFFFFFFF).reshape(5, -1, SLICE)
    for _ in range(20):
        ch = int(torch.randint(0, K, (1,), generator=gen))
        t, j, c = ch // TILE[bits], (ch % TILE[bits]) // 32, ch % 32
        got = (words[:, t, c] >> (bits * j)) & (2**bits - 1)
        assert torch.equal(got, codes[:, ch].long()), (ch, t, j, c)


@late
def test_rejects_bad_shapes():
    gen = torch.Generator().manual_seed(7)
    x, qweight, scales, qzeros, sidx, sw, _ = _random_layer(gen, 2, 256, 64, 4, 16, 0, torch.float16)
    with pytest.raises(ValueError):
        rosaq_fused_linear(x, qweight, scales, qzeros, sidx[:8], sw[:, :8], None, 4, 128)
    with pytest.raises(ValueError):
        rosaq_fused_linear(x, qweight, scales, qzeros, sidx, sw, None, 3, 128)
    x, qweight, scales, qzeros, sidx, sw, _ = _random_layer(gen, 2, 384, 96, 4, 16, 0, torch.float16)
    with pytest.raises(ValueError):  # the checkpoint's packing passed as the kernel layout
        rosaq_fused_linear(x, qweight, scales, qzeros, sidx, sw, None, 4, 128, kernel_layout=True)


@late
@pytest.mark.parametrize("dtype", _DTYPES)
@pytest.mark.parametrize(
    "bits,group_size,K,config",
    [
        (4, 128, 640, (16, 64, 4, 2, 0, 1, 1)),  # swapped + late scale, masked last tile
        (3, 96, 1152, (16, 64, 4, 2, 4, 1, 1)),  # group size not nesting with the tile: scale per slice
        (4, 256, 1024, (16, 32, 4, 2, 0, 0, 1)),  # group of one whole tile
        (3, 32, 512, (32, 64, 4, 2, 0, 1, 0)),  # swapped, scaled operand
        (4, 128, 640, (0, 64, 4, 1, 0, 0, 0)),  # large-M path: dequantize, then torch.matmul
        (3, 96, 1152, (0, 32, 4, 1, 0, 0, 0)),
    ],
)
def test_launch_variants(bits, group_size, K, config, dtype):
    gen = torch.Generator().manual_seed(hash((bits, group_size, K, config, str(dtype))) % 2**31)
    M, N, S = 3, 64, 16
    args = _random_layer(gen, M, K, N, bits, S, 64, dtype, group_size=group_size)
    out = torch.full((M, N), float("nan"), dtype=dtype)
    y = rosaq_fused_linear(*args, bits, group_size, out=out, config=config)
    _check(y, _reference64(*args, bits, group_size), dtype)


@late
@pytest.mark.parametrize(
    "bits,config",
    [
        (4, (1, 32, 4, 2, 0, 0, 0)),  # one-token path, no split
        (3, (1, 64, 4, 2, 8, 0, 0)),  # one-token path, split-K
        (4, (16, 32, 4, 2, 8, 0, 0)),  # tensor-core path for one token, split-K
        (3, (32, 64, 4, 2, 0, 0, 0)),
        (4, (16, 64, 4, 2, 8, 1, 1)),  # swapped tiles (deq(W) · x'ᵀ), late scale, split-K
        (3, (16, 64, 4, 2, 0, 1, 0)),  # swapped tiles
        (4, (32, 32, 4, 2, 0, 0, 1)),  # late scale
        (3, (16, 32, 4, 2, 4, 0, 1)),
    ],
)
def test_explicit_launch_configs(bits, config):
    gen = torch.Generator().manual_seed(50 + bits + config[0])
    M, K, N, S = 1, 1152, 96, 16
    args = _random_layer(gen, M, K, N, bits, S, 0, torch.float16)
    out = torch.full((M, N), float("nan"), dtype=torch.float16)
    y = rosaq_fused_linear(*args, bits, 128, out=out, config=config)
    _check(y, _reference64(*args, bits, 128), torch.float16)


@late
@pytest.mark.parametrize("bits,config", [(4, (16, 32, 4, 2, 8, 1, 0)), (3, (1, 32, 4, 2, 8, 0, 0))])
def test_split_k_reduction_is_deterministic_and_resets_its_counters(bits, config):
    """The in-launch split-K reduction: right result, bit-identical on repeat, every tile counter back at 0."""
    from rosaq_kernels.fused_linear import _COUNTERS, _pick_config

    gen = torch.Generator().manual_seed(70 + bits)
    M, K, N, S = 5, 1536, 96, 32
    args = _random_layer(gen, M, K, N, bits, S, 0, torch.float16)
    split = _pick_config(M, N, K, bits, 128, torch.device("cpu"), config)[-1]
    assert split > 1  # the case must exercise the reduction
    ys = []
    for _ in range(2):
        out = torch.full((M, N), float("nan"), dtype=torch.float16)
        ys.append(rosaq_fused_linear(*args, bits, 128, out=out, config=config))
        counters = _COUNTERS[torch.device("cpu")]
        assert counters.abs().sum().item() == 0, "a split-K tile counter was not reset"
    _check(ys[0], _reference64(*args, bits, 128), torch.float16)
    assert torch.equal(ys[0], ys[1])


def test_tiles_per_step():
    """Two-tile steps exactly where one INT3 tile splits a group and two do not, and only for short row tiles."""
    from rosaq_kernels.fused_linear import tiles_per_step

    assert tiles_per_step(3, 128, 16) == 2  # 320-channel tiles, 640 = 5 groups of 128
    assert tiles_per_step(3, 128, 64) == 1  # 64-row tiles: one tile per step
    assert [tiles_per_step(3, g, 1) for g in (32, 64, 160, 256, 320, 640)] == [1, 1, 1, 1, 1, 1]
    assert [tiles_per_step(4, g, 16) for g in (32, 128, 256, 512, 96)] == [1, 1, 1, 1, 1]


@late
@pytest.mark.parametrize("dtype", _DTYPES)
@pytest.mark.parametrize("M,K,N,S", [(1, 96, 64, 16), (70, 256, 200, 40), (17, 128, 130, 0), (5, 512, 300, 200)])
def test_salient_addmm_adds_the_salient_product_in_place(M, K, N, S, dtype):
    """The Machete path's salient epilogue: ``y += x[:, idx] · wᵀ`` (S not a power of two, S over one chunk of
    ``MAX_BLOCK_S``, N not a multiple of the tile, the column-major weights of ``prepare_weights``, a strided ``y``)
    against float64."""
    from rosaq_kernels.salient import salient_addmm_

    gen = torch.Generator().manual_seed(M * 1000 + S)
    x = torch.randn(M, K, generator=gen).to(dtype)
    idx = torch.randperm(K, generator=gen)[:S].to(torch.int32)
    w = (torch.randn(S, N, generator=gen) * 0.1).half().t()  # [N, S], column-major
    base = torch.randn(M, 2 * N, generator=gen).to(dtype)
    y = base[:, ::2]  # strided view: written in place
    ref = base[:, ::2].double() + x.double()[:, idx.long()] @ w.double().t()
    between = base[:, 1::2].clone()
    assert salient_addmm_(y, x, idx, w) is y
    assert torch.equal(base[:, 1::2], between)  # the columns in between are untouched
    _check(y, ref, dtype)
    with pytest.raises(ValueError, match="do not match"):
        salient_addmm_(y, x[1:], idx, w)


@late
@pytest.mark.parametrize("config", [None, (16, 128, 32), (16, 32, 64), (32, 64, 128)])
def test_block_rotate_tiles(config):
    """``block_rotate`` with its default and other tiles (rows, block rows per product, block columns per program)
    against float64: x · blockdiag(rot) for a 128-channel block, rows not a multiple of the row tile."""
    from rosaq_kernels.fused_linear import block_rotate

    gen = torch.Generator().manual_seed(11)
    x = torch.randn(19, 256, generator=gen).half()
    rot = torch.linalg.qr(torch.randn(2, 128, 128, generator=gen, dtype=torch.float64))[0]
    ref = torch.cat([x.double()[:, b * 128 : (b + 1) * 128] @ rot[b] for b in range(2)], dim=1)
    _check(block_rotate(x, rot.half(), config), ref, torch.float16)
    with pytest.raises(ValueError, match="do not divide"):
        block_rotate(x, rot.half(), (16, 48, 64))


@pytest.mark.parametrize(("env", "enabled"), [(None, True), ("0", False), ("1", True)])
def test_pdl_switch(env, enabled):
    """``ROSAQ_PDL=0`` turns programmatic dependent launch off (read at import); never on the CPU."""
    code = ("import torch, rosaq_kernels.fused_linear as fl; "
            "print(fl.PDL_ENABLED, fl._use_pdl(torch.device('cpu')))")  # fmt: skip
    environ = {k: v for k, v in os.environ.items() if k != "ROSAQ_PDL"} | ({"ROSAQ_PDL": env} if env else {})
    run = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == [str(enabled), "False"]
