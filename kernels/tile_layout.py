"""The fused kernel's weight layout: *tile-interleaved* packing, built once from the checkpoint's packing.

The input dimension is cut into tiles of ``TILE[bits]`` channels (256 for INT4, 512 for INT3; the last tile
is padded with code 0) and each tile into ``SLICES[bits]`` slices of ``SLICE = 32`` consecutive channels.
Packed column ``c`` of a tile holds channel ``32·j + c`` of slice ``j`` for every ``j``, so the kernel cuts a
tile's words into slices with one shift and mask per code, and each slice meets a *contiguous* run of 32
activations (one quantization group, since the group size is a multiple of 32):

* INT4, 32 words per tile: word ``c`` holds channel ``32·j + c`` in bits ``4j .. 4j+3`` (``j < 8``).
* INT3, 48 words per tile: words ``0..31``, the low two bits: word ``c`` holds those of channel ``32·j + c``
  in bits ``2j, 2j+1`` (``j < 16``); words ``32..47``, bit 2: word ``32 + c // 2`` holds that of channel
  ``32·j + c`` at bit ``16·(c % 2) + j``. 3 bits per code, no widened copy.

The words are stored transposed, ``[tiles · words per tile, N]`` int32, contiguous along the output
dimension: a tile is ``[words, BLOCK_N]`` of coalesced 16-byte loads, and one activation serves all the
codes a thread holds of one packed column. The checkpoint's own packing (:mod:`rosaq_kernels.packing`) is
unchanged: this layout exists only in memory (``prepare_weights``).
"""

import torch
from rosaq_kernels.packing import _to_int32, pack, unpack

#: Consecutive input channels per slice (a divisor of every group size the format allows).
SLICE = 32
#: Slices per tile, input channels per tile and int32 words per tile row, by bit width.
SLICES = {4: 8, 3: 16}
TILE = {4: SLICE * 8, 3: SLICE * 16}
TILE_WORDS = {4: 32, 3: 48}


def to_kernel_layout(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Checkpoint words ``[N, packed_width(K)]`` to tile-interleaved words ``[ceil(K / TILE) · TILE_WORDS, N]``."""
    codes = unpack(qweight, bits).to(torch.int64)
    n_rows = codes.shape[0]
    tiles = -(-in_features // TILE[bits])
    codes = torch.nn.functional.pad(codes, (0, tiles * TILE[bits] - in_features))
    codes = codes.view(n_rows, tiles, SLICES[bits], SLICE)  # [N, T, j, c]: channel 32·j + c of each tile
    j = torch.arange(SLICES[bits], dtype=torch.int64, device=codes.device).view(1, 1, -1, 1)
    if bits == 4:
        words = (codes << (4 * j)).sum(2)
    else:
        low = ((codes & 0x3) << (2 * j)).sum(2)  # [N, T, 32]
        bit2 = (((codes >> 2) & 0x1) << j).sum(2)  # [N, T, 32], 16 bits each
        words = torch.cat([low, bit2[..., 0::2] | (bit2[..., 1::2] << 16)], dim=2)
    return _to_int32(words.reshape(n_rows, -1)).t().contiguous()


def from_kernel_layout(kweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`to_kernel_layout`: the checkpoint's words ``[N, packed_width(K)]``."""
    n_rows = kweight.shape[1]
    w = (kweight.t().to(torch.int64) & 0xFFFFFFFF).reshape(n_rows, -1, TILE_WORDS[bits])
    j = torch.arange(SLICES[bits], dtype=torch.int64, device=w.device).view(1, 1, -1, 1)
    if bits == 4:
        codes = (w.unsqueeze(2) >> (4 * j)) & 0xF
    else:
        c = torch.arange(SLICE, device=w.device)
        bit2 = (w[..., SLICE + c // 2] >> (16 * (c % 2))) & 0xFFFF  # [N, T, 32]
        codes = ((w[..., :SLICE].unsqueeze(2) >> (2 * j)) & 0x3) | (((bit2.unsqueeze(2) >> j) & 0x1) << 2)
    return pack(codes.reshape(n_rows, -1)[:, :in_features], bits)
