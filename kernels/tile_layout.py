"""The fused kernel's weight layout: *tile-interleaved* packing, built once from the checkpoint's packing.

The input dimension is cut into tiles of ``TILE[bits]`` channels (256 for INT4, 320 for INT3; the last tile
is padded with code 0) and each tile into ``SLICES[bits]`` slices of ``SLICE = 32`` consecutive channels.
Packed column ``c`` of a tile is one int32 word holding channel ``32·j + c`` of every slice ``j`` in bits
``bits·j .. bits·j + bits - 1`` (INT4: 8 codes per word; INT3: 10 codes, bits 30 and 31 unused). So the
kernel cuts a tile's 32 words into slices with one shift and mask per code (or per pair of codes from two
words, see ``rosaq_kernels.fused_linear.pair_operands``), and each slice meets a *contiguous* run of 32
activations (one quantization group, since the group size is a multiple of 32). INT3 costs 3.2 bits per code
in this layout (no widened INT4 copy); the checkpoint's dense 3-bit packing is unchanged.

The words are stored transposed, ``[tiles · 32, N]`` int32, contiguous along the output dimension: a tile
is ``[32, BLOCK_N]`` of coalesced 16-byte loads, and one activation serves all the codes a thread holds of
one packed column. This layout exists only in memory (``prepare_weights``).
"""

import torch
from rosaq_kernels.packing import _to_int32, pack, unpack

#: Consecutive input channels per slice (a divisor of every group size the format allows).
SLICE = 32
#: Slices per tile and input channels per tile, by bit width (a tile is ``SLICE`` words per output).
SLICES = {4: 8, 3: 10}
TILE = {4: SLICE * 8, 3: SLICE * 10}


def to_kernel_layout(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Checkpoint words ``[N, packed_width(K)]`` to tile-interleaved words ``[ceil(K / TILE) · SLICE, N]``."""
    codes = unpack(qweight, bits).to(torch.int64)
    n_rows = codes.shape[0]
    tiles = -(-in_features // TILE[bits])
    codes = torch.nn.functional.pad(codes, (0, tiles * TILE[bits] - in_features))
    codes = codes.view(n_rows, tiles, SLICES[bits], SLICE)  # [N, T, j, c]: channel 32·j + c of each tile
    j = torch.arange(SLICES[bits], dtype=torch.int64, device=codes.device).view(1, 1, -1, 1)
    words = (codes << (bits * j)).sum(2)  # [N, T, 32]
    return _to_int32(words.reshape(n_rows, -1)).t().contiguous()


def from_kernel_layout(kweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`to_kernel_layout`: the checkpoint's words ``[N, packed_width(K)]``."""
    n_rows = kweight.shape[1]
    w = (kweight.t().to(torch.int64) & 0xFFFFFFFF).reshape(n_rows, -1, SLICE)
    j = torch.arange(SLICES[bits], dtype=torch.int64, device=w.device).view(1, 1, -1, 1)
    codes = (w.unsqueeze(2) >> (bits * j)) & (2**bits - 1)  # [N, T, j, c]
    return pack(codes.reshape(n_rows, -1)[:, :in_features], bits)
