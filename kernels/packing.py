"""Packing of INT4 / INT3 codes along the input dimension into int32 words.

Layouts (one row of ``in_features`` codes, ``0 <= code < 2**bits``):

* INT4: 8 codes per int32; code ``j`` sits in bits ``4*(j % 8) .. 4*(j % 8)+3`` of word ``j // 8``.
* INT3: bit planes, 3 words per chunk of 32 codes. In chunk ``c`` (codes ``32c .. 32c+31``):
  word ``3c + 0`` holds the low 2 bits of codes ``0..15`` (code ``i`` at bits ``2i, 2i+1``),
  word ``3c + 1`` the low 2 bits of codes ``16..31``, and word ``3c + 2`` bit 2 of all 32 codes
  (code ``i`` at bit ``i``). No code straddles a word, so a kernel unpacks with shifts and masks.

Every chunk is self-contained, so slicing the input dimension at a multiple of 32 channels
(tensor-parallel sharding) slices the packed words at the matching word.

Zero points (one per output and group, ``[N, G]``) are packed the same way along the *outputs*
(:func:`pack_zeros`: ``[G, packed_width(N)]``), as AWQ packs them: ``bits`` per zero point, and ``N`` is a
multiple of the chunk in every model, where the group count often is not.
"""

import torch

#: Input channels per self-contained packed chunk, by bit width.
CHUNK_CHANNELS = {4: 8, 3: 32}
#: int32 words per chunk, by bit width.
CHUNK_WORDS = {4: 1, 3: 3}


def _check_bits(bits: int) -> None:
    if bits not in CHUNK_CHANNELS:
        raise ValueError(f"bits must be 3 or 4, got {bits}")


def packed_width(in_features: int, bits: int) -> int:
    """Number of int32 words that hold one row of ``in_features`` codes."""
    _check_bits(bits)
    chunk = CHUNK_CHANNELS[bits]
    if in_features % chunk:
        raise ValueError(f"INT{bits} packing needs in_features divisible by {chunk}, got {in_features}")
    return in_features // chunk * CHUNK_WORDS[bits]


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Reinterpret non-negative int64 values < 2**32 as int32 bit patterns."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes ``[N, K]`` (integer dtype, values in ``[0, 2**bits)``) into int32 ``[N, packed_width(K)]``."""
    n_rows, in_features = codes.shape
    width = packed_width(in_features, bits)
    c = codes.to(torch.int64)
    if bits == 4:
        shifts = 4 * torch.arange(8, dtype=torch.int64, device=c.device)
        words = (c.view(n_rows, -1, 8) << shifts).sum(-1)
        return _to_int32(words)
    chunks = c.view(n_rows, -1, 32)
    low = chunks & 0b11
    shifts2 = 2 * torch.arange(16, dtype=torch.int64, device=c.device)
    low_words = (low.view(n_rows, -1, 2, 16) << shifts2).sum(-1)  # [N, C, 2]
    shifts1 = torch.arange(32, dtype=torch.int64, device=c.device)
    high_word = ((chunks >> 2) << shifts1).sum(-1, keepdim=True)  # [N, C, 1]
    words = torch.cat([low_words, high_word], dim=-1).reshape(n_rows, width)
    return _to_int32(words)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack`: int32 ``[N, W]`` to int32 codes ``[N, K]``."""
    _check_bits(bits)
    n_rows = packed.shape[0]
    w = packed.to(torch.int64) & 0xFFFFFFFF
    if bits == 4:
        shifts = 4 * torch.arange(8, dtype=torch.int64, device=w.device)
        return ((w.unsqueeze(-1) >> shifts) & 0xF).reshape(n_rows, -1).to(torch.int32)
    words = w.view(n_rows, -1, 3)
    shifts2 = 2 * torch.arange(16, dtype=torch.int64, device=w.device)
    low = ((words[..., :2].unsqueeze(-1) >> shifts2) & 0b11).reshape(n_rows, -1, 32)
    shifts1 = torch.arange(32, dtype=torch.int64, device=w.device)
    high = (words[..., 2:3] >> shifts1) & 1
    return (low | (high << 2)).reshape(n_rows, -1).to(torch.int32)


def pack_zeros(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack zero points ``[N, G]`` (values in ``[0, 2**bits)``) along the outputs: int32 ``[G, packed_width(N)]``."""
    return pack(zeros.t().contiguous(), bits)


def unpack_zeros(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_zeros`: uint8 zero points ``[N, G]``."""
    return unpack(packed, bits).t().to(torch.uint8).contiguous()
