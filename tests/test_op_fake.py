"""``torch.ops.rosaq.linear``'s fake implementation agrees with the op (what torch.compile and vLLM trace).

Both weight layouts: the checkpoint's packing (``qweight [N, packed K]``) and the kernel's tile-interleaved
layout (``qweight [words, N]``, what serving passes on the GPU; on the CPU the op undoes it). A wrong fake
shape is invisible in eager mode and breaks vLLM's compiled model.
"""

import pytest
import rosaq_kernels.ops  # noqa: F401  (registers torch.ops.rosaq.linear)
import torch
from rosaq_kernels.packing import pack
from rosaq_kernels.reference import rosaq_linear_reference
from rosaq_kernels.tile_layout import to_kernel_layout


def _layer(gen, M, K, N, bits, S, group_size=64):
    x = torch.randn(M, K, generator=gen)
    codes = torch.randint(0, 2**bits, (N, K), generator=gen)
    scales = torch.rand(N, K // group_size, generator=gen) * 0.02 + 0.005
    qzeros = torch.randint(0, 2**bits, (N, K // group_size), generator=gen, dtype=torch.uint8)
    sidx = torch.randperm(K, generator=gen)[:S].to(torch.int32)
    sw = torch.randn(N, S, generator=gen) * 0.1
    return x, pack(codes, bits), scales, qzeros, sidx, sw


@pytest.mark.parametrize("kernel_layout", [False, True])
@pytest.mark.parametrize("bits", [4, 3])
def test_fake_matches_op(bits, kernel_layout):
    gen = torch.Generator().manual_seed(bits + 10 * kernel_layout)
    x, qweight, scales, qzeros, sidx, sw = _layer(gen, 5, 320, 40, bits, 16)  # N != the layout's words
    ref = rosaq_linear_reference(x, qweight, scales, qzeros, sidx, sw, None, bits, 64)
    if kernel_layout:
        qweight = to_kernel_layout(qweight, bits, 320)
    args = (x, qweight, scales, qzeros, sidx, sw, None, bits, 64, kernel_layout)
    torch.library.opcheck(torch.ops.rosaq.linear.default, args, test_utils=("test_schema", "test_faketensor"))
    y = torch.compile(lambda *a: torch.ops.rosaq.linear(*a) * 2.0, fullgraph=True, backend="aot_eager")(*args)
    assert y.shape == (5, 40)
    torch.testing.assert_close(y, 2.0 * ref, rtol=1e-4, atol=1e-4)
