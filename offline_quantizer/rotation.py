"""Second moments, PCA bases and the ways a basis is applied to weights.

Conventions: a linear computes ``y = x · Wᵀ`` with ``W [out, in]``. Rotating its input by an
orthogonal ``R`` (the layer then receives ``x·R``) means ``W ← W·R``; making its output arrive as
``y·R`` means ``W ← Rᵀ·W`` and ``b ← b·R``.
"""

import torch
from torch import nn


class BlockSecondMoment:
    """Running block-diagonal second moment ``Σ w_t x_tᵀx_t`` of a ``dim``-wide activation (float32 products per
    batch, accumulated in float64), and the peak magnitude ``max |x_i|`` of every channel.

    ``block == dim`` keeps the full matrix, ``block == 1`` only its diagonal. ``first_token_weight``: ``w_t`` of
    position 0 of every sequence of ``[batch, seq, dim]`` activations (the attention sink), 1 for every other token.
    """

    def __init__(self, dim: int, block: int, device: torch.device | str = "cpu", first_token_weight: float = 1.0
                 ) -> None:
        if dim % block:
            raise ValueError(f"block {block} does not divide dim {dim}")
        if first_token_weight < 0:
            raise ValueError(f"first_token_weight must be >= 0, got {first_token_weight}")
        self.block = block
        self.first_token_weight = first_token_weight
        self.sum = torch.zeros(dim // block, block, block, dtype=torch.float64, device=device)
        self.peak = torch.zeros(dim, dtype=torch.float32, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        """Accumulate activations ``x [..., dim]`` (``[batch, seq, dim]`` for the first-token weight)."""
        if self.first_token_weight != 1.0 and x.dim() != 3:
            raise ValueError(f"a first-token weight needs [batch, seq, dim] activations, got {tuple(x.shape)}")
        x = x.to(self.sum.device, torch.float32)
        self.peak = torch.maximum(self.peak, x.abs().reshape(-1, self.peak.numel()).amax(0))  # unweighted
        if self.first_token_weight != 1.0:
            x = torch.cat([x[:, :1] * self.first_token_weight**0.5, x[:, 1:]], dim=1)
        xb = x.reshape(-1, self.sum.shape[0], self.block)
        if self.block == 1:
            batch_sum = xb.square().sum(0).unsqueeze(-1)
        else:
            blocks = xb.transpose(0, 1)  # [nb, T, B]
            batch_sum = torch.bmm(blocks.transpose(1, 2), blocks)
        self.sum += batch_sum.to(torch.float64)  # float32 per batch, float64 across batches
        self.count += xb.shape[0]

    def mean(self) -> torch.Tensor:
        """``[nb, B, B]`` mean second moment."""
        if self.count == 0:
            raise RuntimeError("no calibration activations were recorded")
        return self.sum / self.count

    def diagonal(self) -> torch.Tensor:
        """``[dim]`` per-channel energy ``E[x_i²]``."""
        return torch.diagonal(self.mean(), dim1=-2, dim2=-1).reshape(-1)


def pca_basis(moment: torch.Tensor, damping: float = 0.01, keep_axis: torch.Tensor | None = None) -> torch.Tensor:
    """Eigenvectors of damped (batched) second moments, columns in descending eigenvalue order.

    Args:
        moment: float64 ``[..., d, d]`` symmetric positive semi-definite.
        damping: added to the diagonal as a fraction of its mean (SliceGPT's recipe).
        keep_axis: optional bool ``[..., d]``: channels that keep their own axis (the basis is the
            identity there and the PCA of the other channels elsewhere), e.g. massive-activation channels.
    Returns:
        float64 ``[..., d, d]`` orthogonal ``R``; without ``keep_axis``, ``Rᵀ·moment·R`` is diagonal and decreasing.
    """
    d = moment.shape[-1]
    eye = torch.eye(d, dtype=moment.dtype, device=moment.device)
    diag_mean = torch.diagonal(moment, dim1=-2, dim2=-1).mean(-1)[..., None, None]
    damped = moment + damping * diag_mean * eye
    if keep_axis is None or not keep_axis.any():
        return torch.linalg.eigh(damped)[1].flip(-1)
    flat_moment, flat_keep = damped.reshape(-1, d, d), keep_axis.reshape(-1, d)
    bases = eye.repeat(flat_moment.shape[0], 1, 1)
    for block, (h, keep) in enumerate(zip(flat_moment, flat_keep, strict=True)):
        rest = torch.nonzero(~keep).flatten()
        if rest.numel():
            bases[block, rest.unsqueeze(1), rest.unsqueeze(0)] = torch.linalg.eigh(h[rest][:, rest])[1].flip(-1)
    return bases.reshape(moment.shape)


def random_orthogonal(n: int, seed: int = 0) -> torch.Tensor:
    """A Haar-random orthogonal float64 ``[n, n]`` (QR of a Gaussian matrix, signs fixed); the same for the same
    ``(n, seed)`` on every machine (CPU generator)."""
    gaussian = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def mix_complement(basis: torch.Tensor, principal: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Mix the non-principal columns of (batched) bases by a random orthogonal matrix, block by block.

    The principal columns (those kept in fp16, e.g. the top PCA directions) are unchanged; the others are
    replaced by ``basis[:, rest] · Q`` with a random orthogonal ``Q``: the same subspace, so the salient part of
    the product is unchanged, but the quantized channels become *incoherent* (every one a mix of many PCA
    directions, as QuaRot's rotations make them): no quantization group holds all the high-variance directions,
    and GPTQ's error compensation has correlations to use (in a PCA basis the second moment is diagonal).

    Args:
        basis: float64 ``[..., B, B]`` orthogonal, columns are channels.
        principal: bool ``[..., B]`` columns to keep.
    Returns:
        float64 ``[..., B, B]`` orthogonal, spanning the same principal subspace per block.
    """
    size = basis.shape[-1]
    mixed, keep = basis.reshape(-1, size, size).clone(), principal.reshape(-1, size)
    for block, block_keep in enumerate(keep):
        rest = torch.nonzero(~block_keep).flatten()
        if rest.numel() > 1:
            q = random_orthogonal(rest.numel(), seed).to(mixed.device)
            mixed[block][:, rest] = mixed[block][:, rest] @ q
    return mixed.reshape(basis.shape)


def rotated_energy(moment: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Per-channel energy ``diag(Rᵀ H R)`` of block moments ``[nb,B,B]`` in block bases ``[nb,B,B]``, flat."""
    return torch.einsum("nij,nik,nkj->nj", basis, moment, basis).reshape(-1)


def block_diag(blocks: torch.Tensor) -> torch.Tensor:
    """``[nb, B, B]`` to the dense ``[nb·B, nb·B]`` block-diagonal matrix."""
    return torch.block_diag(*blocks)


@torch.no_grad()
def rotate_input(linear: nn.Linear, basis: torch.Tensor) -> None:
    """``W ← W·R`` for a dense ``R [in, in]``."""
    w = linear.weight.to(torch.float64) @ basis.to(linear.weight.device)
    linear.weight.copy_(w.to(linear.weight.dtype))


@torch.no_grad()
def rotate_output(linear: nn.Linear, basis: torch.Tensor) -> None:
    """``W ← Rᵀ·W``, ``b ← b·R`` for a dense ``R [out, out]``."""
    basis = basis.to(linear.weight.device)
    linear.weight.copy_((basis.t() @ linear.weight.to(torch.float64)).to(linear.weight.dtype))
    if linear.bias is not None:
        linear.bias.copy_((linear.bias.to(torch.float64) @ basis).to(linear.bias.dtype))


@torch.no_grad()
def rotate_embedding(embedding: nn.Embedding, basis: torch.Tensor) -> None:
    """``E ← E·R``: the residual stream starts in the rotated basis."""
    w = embedding.weight.to(torch.float64) @ basis.to(embedding.weight.device)
    embedding.weight.copy_(w.to(embedding.weight.dtype))


@torch.no_grad()
def rotate_value_output(
    v_proj: nn.Linear, o_proj: nn.Linear, head_bases: torch.Tensor, num_heads: int
) -> None:
    """Absorb a per-KV-head basis ``R_g [kv, hd, hd]`` into v_proj's output and o_proj's input.

    ``v_g ← v_g·R_g`` (rows of v_proj), and every query head ``h`` of group ``g`` reads ``o_h·R_g``
    (columns of o_proj): attention mixes tokens, not channels, so the product is unchanged.
    """
    num_kv, head_dim, _ = head_bases.shape
    rotate_output(v_proj, block_diag(head_bases))
    per_query_head = head_bases.repeat_interleave(num_heads // num_kv, dim=0)
    rotate_input(o_proj, block_diag(per_query_head))
