"""The large-M Machete path (``rosaq_kernels.machete``) on the CPU: operands and the op's dispatch.

Machete itself (``torch.ops._C.machete_mm``, CUTLASS, sm_90) runs only on the GPU, where
``benchmarks/check_kernels_gpu.py`` checks it. Here its documented semantics are emulated in torch:
``b_q`` is GPTQ's packing along the inputs (``[K/8, N]``, code ``k`` at bits ``4·(k % 8)`` of word ``k // 8``) and
a weight dequantizes to ``code · s + z`` with ``s, z`` the ``[K/g, N]`` group scales and zeros. That tests what
this project controls: the conversion of the checkpoint's tensors and the op's dispatch by M.
"""

import pytest
import rosaq_kernels.ops
import torch
from rosaq_kernels.machete import MACHETE_MIN_M, machete_operands, machete_supported
from rosaq_kernels.packing import pack
from rosaq_kernels.reference import dequantize, rosaq_linear_reference

GROUP = 64


def _layer(gen, K, N, S):
    codes = torch.randint(0, 16, (N, K), generator=gen)
    scales = torch.rand(N, K // GROUP, generator=gen) * 0.02 + 0.005
    qzeros = torch.randint(0, 16, (N, K // GROUP), generator=gen, dtype=torch.uint8)
    sidx = torch.randperm(K, generator=gen)[:S].sort().values.to(torch.int32)
    codes[:, sidx.long()] = qzeros.repeat_interleave(GROUP, dim=1)[:, sidx.long()].long()  # as the quantizer
    sw = torch.randn(N, S, generator=gen) * 0.1
    return pack(codes, 4), scales.half(), qzeros, sidx, sw.half()


def _emulated_machete_weight(b_q: torch.Tensor, b_scales: torch.Tensor, b_zeros: torch.Tensor) -> torch.Tensor:
    """Machete's dequantized ``[K, N]`` float32 weight from its unpacked operands."""
    shifts = 4 * torch.arange(8, dtype=torch.int64)
    codes = (b_q.to(torch.int64).unsqueeze(1) >> shifts.view(1, 8, 1)) & 0xF  # [K/8, 8, N]
    codes = codes.reshape(-1, b_q.shape[1]).to(torch.float32)
    group = codes.shape[0] // b_scales.shape[0]
    s = b_scales.to(torch.float32).repeat_interleave(group, dim=0)
    z = b_zeros.to(torch.float32).repeat_interleave(group, dim=0)
    return codes * s + z


def _emulated_machete_linear(x, b_q, b_scales, b_zeros, salient_idx, salient_weight, rot, group_size):
    assert rot is None and group_size == GROUP
    xf = x.to(torch.float32)
    y = xf @ _emulated_machete_weight(b_q, b_scales, b_zeros)
    y = y + xf[:, salient_idx.long()] @ salient_weight.to(torch.float32).t()
    return y.to(x.dtype)


@pytest.mark.parametrize("act_dtype", [torch.float16, torch.bfloat16])
def test_operands_dequantize_like_the_checkpoint(act_dtype):
    gen = torch.Generator().manual_seed(7)
    qweight, scales, qzeros, sidx, _ = _layer(gen, 256, 48, 16)
    b_q, b_scales, b_zeros = machete_operands(qweight, scales, qzeros, act_dtype)
    assert b_q.shape == (32, 48) and b_scales.shape == b_zeros.shape == (4, 48)
    assert b_scales.dtype == b_zeros.dtype == act_dtype and b_scales.is_contiguous() and b_zeros.is_contiguous()
    ours = dequantize(qweight, scales.to(act_dtype), qzeros, 4, GROUP).t()  # [K, N], scales as Machete sees them
    theirs = _emulated_machete_weight(b_q, b_scales, b_zeros)
    # The only difference is the rounding of z = -zero · s to the activation dtype: half an ulp of z.
    ulp = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[act_dtype]
    bound = (b_zeros.to(torch.float32).abs() * ulp).repeat_interleave(GROUP, dim=0)
    assert ((ours - theirs).abs() <= bound + 1e-7).all()
    assert (ours - theirs).abs().max() > 0 or act_dtype == torch.float16  # the rounding is real in bf16
    # Salient columns stay (almost) zero: code = zero point.
    assert theirs[sidx.long()].abs().max() <= bound[sidx.long()].max() + 1e-7


def test_op_dispatches_to_machete_from_min_m(monkeypatch):
    gen = torch.Generator().manual_seed(8)
    K, N, S = 256, 64, 16
    qweight, scales, qzeros, sidx, sw = _layer(gen, K, N, S)
    b_q, b_scales, b_zeros = machete_operands(qweight, scales, qzeros, torch.float16)
    calls = []

    def fake_machete(*args):
        calls.append(args[0].shape[0])
        return _emulated_machete_linear(*args)

    monkeypatch.setattr(rosaq_kernels.ops, "machete_linear", fake_machete)
    for M in (MACHETE_MIN_M - 1, MACHETE_MIN_M, 3 * MACHETE_MIN_M):
        x = torch.randn(M, K, generator=gen).half()
        args = (x, qweight, scales, qzeros, sidx, sw, None, 4, GROUP, False, b_q, b_scales, b_zeros)
        y = torch.ops.rosaq.linear(*args)
        ref = rosaq_linear_reference(x.float(), qweight, scales, qzeros, sidx, sw, None, 4, GROUP)
        assert y.dtype == torch.float16 and not torch.isnan(y).any()
        assert ((y.float() - ref).norm() / ref.norm()).item() < 1e-3  # fp16 rounding of z and of y
    assert calls == [MACHETE_MIN_M, 3 * MACHETE_MIN_M]
    # Activations of another dtype than Machete's copy take the other path.
    y = torch.ops.rosaq.linear(x.float(), *args[1:])
    assert calls == [MACHETE_MIN_M, 3 * MACHETE_MIN_M] and y.dtype == torch.float32
    torch.library.opcheck(torch.ops.rosaq.linear.default, args, test_utils=("test_schema", "test_faketensor"))


def test_not_supported_off_hopper(monkeypatch):
    args = (torch.device("cpu"), 4, 128, 4096, 4096, torch.float16)
    assert not machete_supported(*args)
    monkeypatch.setenv("ROSAQ_MACHETE", "0")
    assert not machete_supported(*args)


def test_machete_env_is_a_compile_cache_factor(monkeypatch):
    """Toggling ROSAQ_MACHETE changes the graph's inputs, so vLLM's compile cache key must change with it."""
    import vllm.envs as envs

    import rosaq_vllm

    rosaq_vllm.register()
    monkeypatch.delenv("ROSAQ_MACHETE", raising=False)
    default = envs.compile_factors()
    monkeypatch.setenv("ROSAQ_MACHETE", "0")
    off = envs.compile_factors()
    assert "ROSAQ_MACHETE" in default and default["ROSAQ_MACHETE"] != off["ROSAQ_MACHETE"]
