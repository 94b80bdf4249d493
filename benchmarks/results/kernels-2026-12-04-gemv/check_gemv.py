"""GPU check of the tried GEMV (apply tried-gemv.diff first): M = 1 through fused_linear vs float64."""

import torch
from rosaq_kernels.fused_linear import fused_linear, prepare_weights
from rosaq_kernels.packing import pack
from rosaq_kernels.reference import rosaq_linear_reference

g = torch.Generator(device="cuda").manual_seed(3)
for K, N, scale, dt in [
    (4096, 4096, 1.0, torch.float16),
    (11008, 4096, -1.0, torch.float16),
    (4096, 12288, 1.0, torch.bfloat16),
    (4096, 4096, 1e-3, torch.float16),
]:
    codes = torch.randint(0, 16, (N, K), device="cuda", generator=g)
    q = pack(codes, 4)
    sc = torch.rand(N, K // 128, device="cuda", generator=g) * 0.02 + 0.005
    zp = torch.randint(0, 16, (N, K // 128), device="cuda", generator=g)
    S = 48
    sidx = torch.randperm(K, device="cuda", generator=g)[:S].to(torch.int32)
    sw = torch.randn(N, S, device="cuda", generator=g) * 0.05
    p = prepare_weights(q, sc, zp, sidx, sw, None, 4, 128)
    x = torch.randn(1, K, device="cuda", generator=g) * abs(scale)
    if scale < 0:  # a few massive activations (as in Llama's down_proj inputs)
        x[0, :: K // 8] = 8000.0
    x = x.to(dt)
    ref = rosaq_linear_reference(
        x.double(), q, p["scales"].double(), zp, sidx, p["salient_weight"].double(), None, 4, 128
    )
    y = fused_linear(x, p, 4, 128)
    err = ((y.double() - ref).norm() / ref.norm()).item()
    print(f"GEMV K={K} N={N} |x|~{scale} {dt}: rel err {err:.2e} finite={bool(torch.isfinite(y).all())}", flush=True)
