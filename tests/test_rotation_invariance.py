"""Absorbing the rotations changes nothing: the rotated fp model computes the original function."""

import pytest
import torch
from rosaq_kernels.reference import rotate_blocks
from torch import nn
from transformers import AutoModelForCausalLM

from offline_quantizer.adapters import DecoderAdapter
from offline_quantizer.pipeline import QuantizeOptions, RotatedLinear, rotate_model


class _RotatedFloatLinear(nn.Module):
    """``x -> (x·blockdiag(rot))·Wᵀ + b`` in float64: a projection in its final basis, unquantized."""

    def __init__(self, rotated: RotatedLinear, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.rotated, self.bias = rotated, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(torch.float64)
        if self.rotated.rot is not None:
            nb, block, _ = self.rotated.rot.shape
            flat = torch.einsum("mnb,nbc->mnc", flat.view(-1, nb, block), self.rotated.rot).reshape(flat.shape)
        y = flat @ self.rotated.weight.t()
        if self.bias is not None:
            y = y + self.bias.to(torch.float64)
        return y.to(x.dtype).reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("rotation", ["absorbed", "per-layer", "none"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rotated_model_preserves_logits(tiny_model_dir, arch: str, rotation: str, dtype: torch.dtype) -> None:
    """float32 matters too: there the pipeline's float64 copies of weights are real copies (a stale copy of
    a projection that a later site rotates once went unnoticed in float64)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(arch), dtype=dtype).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    batches = [torch.randint(0, model.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(2))]
    adapter = DecoderAdapter(model)
    original_embedding = adapter.embedding.weight.detach().clone()

    def install(index: int, projections: dict[str, RotatedLinear]) -> None:
        layer = adapter.layers[index]
        for name, rotated in projections.items():
            parent = layer.mlp if name in ("gate_proj", "up_proj", "down_proj") else layer.self_attn
            setattr(parent, name, _RotatedFloatLinear(rotated, getattr(parent, name).bias))

    opts = QuantizeOptions(group_size=32, salient=16, rotation=rotation, block_size=64)
    rotate_model(model, batches, opts, install)
    residual_rotated = not torch.allclose(adapter.embedding.weight, original_embedding)
    assert residual_rotated == (rotation == "absorbed")
    with torch.no_grad():
        got = model(input_ids=ids).logits
    # transformers computes RMSNorm statistics in float32, hence float32-level agreement.
    tol = 1e-5 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol * expected.abs().max().item())


def test_rotate_blocks_is_orthogonal_change_of_basis() -> None:
    rot = torch.linalg.qr(torch.randn(3, 16, 16, dtype=torch.float64)).Q
    x = torch.randn(4, 48, dtype=torch.float64)
    y = rotate_blocks(x, rot).to(torch.float64)
    torch.testing.assert_close(y.norm(dim=1), x.norm(dim=1), rtol=1e-5, atol=1e-5)
