"""Absorbing the rotations changes nothing: the rotated fp model computes the original function."""

import dataclasses

import pytest
import torch
from rosaq_kernels.reference import rotate_blocks
from torch import nn
from transformers import AutoModelForCausalLM

from offline_quantizer.adapters import DecoderAdapter
from offline_quantizer.pipeline import QuantizeOptions, RotatedLinear, incoherent_complement, rotate_model
from offline_quantizer.rotation import BlockSecondMoment, mix_complement, pca_basis, rotated_energy


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


_CASES = [(arch, rotation, dtype, "pca") for arch in ("llama", "qwen2", "mistral")
          for rotation in ("absorbed", "per-layer", "none") for dtype in (torch.float64, torch.float32)]
# the mixed complements: every site's basis changes, or all but the V/O heads' (qwen2's tiny model has grouped KV heads)
_CASES += [(arch, rotation, torch.float64, complement) for arch in ("llama", "qwen2")
           for rotation in ("absorbed", "per-layer") for complement in ("random", "random-except-vo")]
_CASES = [(*case, 64) for case in _CASES]
# block size 0: one online block over the whole input (down_proj for absorbed, every site for per-layer)
_CASES += [("llama", rotation, torch.float64, "pca", 0) for rotation in ("absorbed", "per-layer")]
_CASES = [(*case, 1.0) for case in _CASES]
# the attention sink weighted in the moments: other bases, the same function
_CASES += [(arch, "absorbed", torch.float64, "random-except-vo", 64, 64.0) for arch in ("llama", "qwen2")]
_CASES = [(*case, True) for case in _CASES]
# down_proj left in its original basis: no online rotation, the same function
_CASES += [(arch, "absorbed", dtype, "random-except-vo", 64, 1.0, False) for arch in ("llama", "qwen2")
           for dtype in (torch.float64, torch.float32)]


@pytest.mark.parametrize(("arch", "rotation", "dtype", "complement", "block_size", "sink_weight", "online_rotation"),
                         _CASES)
def test_rotated_model_preserves_logits(tiny_model_dir, arch: str, rotation: str, dtype: torch.dtype,
                                        complement: str, block_size: int, sink_weight: float,
                                        online_rotation: bool) -> None:
    """float32 matters too: there the pipeline's float64 copies of weights are real copies (a stale copy of
    a projection that a later site rotates once went unnoticed in float64)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(arch), dtype=dtype).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    batches = [torch.randint(0, model.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(2))]
    adapter = DecoderAdapter(model)
    original_embedding = adapter.embedding.weight.detach().clone()
    original_down = [layer.mlp.down_proj.weight.detach().to(torch.float64) for layer in adapter.layers]

    def install(index: int, projections: dict[str, RotatedLinear]) -> None:
        layer = adapter.layers[index]
        down = projections["down_proj"]
        assert (down.rot is not None) == (rotation != "none" and online_rotation)
        if not online_rotation:  # original input basis: only the output side rotated, input columns keep their norms
            torch.testing.assert_close(down.weight.norm(dim=0), original_down[index].norm(dim=0), rtol=1e-5, atol=0)
        for name, rotated in projections.items():
            parent = layer.mlp if name in ("gate_proj", "up_proj", "down_proj") else layer.self_attn
            setattr(parent, name, _RotatedFloatLinear(rotated, getattr(parent, name).bias))

    opts = QuantizeOptions(group_size=32, salient=16, rotation=rotation, block_size=block_size, complement=complement,
                           sink_weight=sink_weight, online_rotation=online_rotation)
    rotate_model(model, batches, opts, install)
    residual_rotated = not torch.allclose(adapter.embedding.weight, original_embedding)
    assert residual_rotated == (rotation == "absorbed")
    with torch.no_grad():
        got = model(input_ids=ids).logits
    # transformers computes RMSNorm statistics in float32, hence float32-level agreement.
    tol = 1e-5 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol * expected.abs().max().item())


@pytest.mark.parametrize("weight", [0.0, 1.0, 64.0])
def test_second_moment_weighs_the_first_token(weight: float) -> None:
    """``Σ w_t x_tᵀx_t`` against float64 with ``w_0 = weight`` (1 elsewhere), over two batches; peaks unweighted."""
    g = torch.Generator().manual_seed(6)
    batches = [torch.randn(2, 7, 16, generator=g) * torch.logspace(0.5, -0.5, 16) for _ in range(2)]
    moment = BlockSecondMoment(16, 8, first_token_weight=weight)
    for x in batches:
        moment.add(x)
    x = torch.cat(batches).to(torch.float64)
    w = torch.ones(7, dtype=torch.float64)
    w[0] = weight
    full = torch.einsum("bti,btj,t->ij", x, x, w)
    expected = torch.stack([full[:8, :8], full[8:, 8:]])
    torch.testing.assert_close(moment.sum, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    torch.testing.assert_close(moment.peak, x.abs().amax((0, 1)).to(torch.float32))
    assert moment.count == 28
    if weight != 1.0:
        with pytest.raises(ValueError, match=r"\[batch, seq, dim\]"):
            moment.add(batches[0][0])
    with pytest.raises(ValueError, match="first_token_weight"):
        BlockSecondMoment(16, 8, first_token_weight=-1.0)


def test_rotate_blocks_is_orthogonal_change_of_basis() -> None:
    rot = torch.linalg.qr(torch.randn(3, 16, 16, dtype=torch.float64)).Q
    x = torch.randn(4, 48, dtype=torch.float64)
    y = rotate_blocks(x, rot).to(torch.float64)
    torch.testing.assert_close(y.norm(dim=1), x.norm(dim=1), rtol=1e-5, atol=1e-5)


def _moments(count: int, dim: int, seed: int) -> torch.Tensor:
    """``[count, dim, dim]`` second moments with a few dominant directions (random data, never zero)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(count, 256, dim, generator=g, dtype=torch.float64)
    x = x * torch.logspace(1, -1, dim, dtype=torch.float64)  # decaying channel scales
    return x.transpose(1, 2) @ x / 256


def test_mix_complement_keeps_principal_columns_and_subspace() -> None:
    moment = _moments(3, 32, seed=3)
    basis = pca_basis(moment)
    principal = torch.zeros(3, 32, dtype=torch.bool)
    principal[:, :5] = True
    principal[1, 7] = True
    mixed = mix_complement(basis, principal)
    eye = torch.eye(32, dtype=torch.float64).expand(3, 32, 32)
    torch.testing.assert_close(mixed.transpose(1, 2) @ mixed, eye, rtol=0, atol=1e-12)
    columns = principal.unsqueeze(1).expand_as(basis)
    torch.testing.assert_close(mixed[columns], basis[columns])
    for b in range(3):
        rest = ~principal[b]
        # same complement subspace: its projector is unchanged
        p_old = basis[b][:, rest] @ basis[b][:, rest].t()
        p_new = mixed[b][:, rest] @ mixed[b][:, rest].t()
        torch.testing.assert_close(p_new, p_old, rtol=0, atol=1e-12)
        assert not torch.allclose(mixed[b][:, rest], basis[b][:, rest])
        # incoherent: the complement's energy is spread (no mixed column near the largest complement eigenvalue)
        old_energy = rotated_energy(moment[b:b + 1], basis[b:b + 1])[rest]
        new_energy = rotated_energy(moment[b:b + 1], mixed[b:b + 1])[rest]
        torch.testing.assert_close(new_energy.sum(), old_energy.sum())
        assert new_energy.max() < 0.5 * old_energy.max()


@pytest.mark.parametrize("group", [1, 2])
def test_incoherent_complement_keeps_the_salient_selection(group: int) -> None:
    """The channels the salient selection keeps (top-K energy, outliers always) are those the mix left alone."""
    nb, size = 2, 64
    moment = _moments(nb * group, size, seed=4)
    basis = pca_basis(moment.view(nb, group, size, size).sum(1))
    outliers = torch.zeros(nb * group * size, dtype=torch.bool)
    outliers[size + 40] = True  # a low-energy channel that must stay salient anyway
    opts = QuantizeOptions(group_size=32, salient=16, rotation="per-layer", complement="random")
    mixed = incoherent_complement(basis, moment, outliers, opts, "mlp_out", group)

    def top(b: torch.Tensor) -> set[int]:
        energy = torch.where(outliers, torch.inf, rotated_energy(moment, b.repeat_interleave(group, dim=0)))
        return set(torch.topk(energy, 16).indices.tolist())

    assert top(mixed) == top(basis)
    assert not torch.allclose(mixed, basis)
    # another --seed: another mix of the same complement, the same salient channels
    reseeded = incoherent_complement(basis, moment, outliers, dataclasses.replace(opts, seed=1), "mlp_out", group)
    assert top(reseeded) == top(basis) and not torch.allclose(reseeded, mixed)
    assert torch.equal(incoherent_complement(basis, moment, outliers, opts, "mlp_out", group), mixed)
    assert incoherent_complement(basis, moment, outliers, QuantizeOptions(salient=16), "mlp_out", group) is basis


@pytest.mark.parametrize(("complement", "mixed_sites"), [("random", {"residual", "attn_out", "mlp_out"}),
                                                         ("random-except-vo", {"residual", "mlp_out"})])
def test_complement_mixes_only_its_sites(complement: str, mixed_sites: set[str]) -> None:
    """``random-except-vo`` keeps the PCA basis of the V/O heads ("attn_out") and mixes the other sites."""
    moment = _moments(2, 64, seed=5)
    basis = pca_basis(moment)
    outliers = torch.zeros(2 * 64, dtype=torch.bool)
    opts = QuantizeOptions(group_size=32, salient=16, rotation="absorbed", complement=complement)
    for site in ("residual", "attn_out", "mlp_out"):
        unchanged = incoherent_complement(basis, moment, outliers, opts, site) is basis
        assert unchanged == (site not in mixed_sites), site


@pytest.mark.parametrize("complement", ["random", "random-except-vo"])
def test_mixed_complement_needs_a_rotation(complement: str) -> None:
    with pytest.raises(ValueError, match="rotation 'none'"):
        QuantizeOptions(rotation="none", complement=complement).quant_config()
    with pytest.raises(ValueError, match="complement must be one of"):
        QuantizeOptions(complement="hadamard").quant_config()
