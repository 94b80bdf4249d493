"""The inline-PTX pair extraction of the fused kernel, emulated on the CPU against the tile layout.

On the GPU ``_magic_slice`` runs ``prmt`` / ``shr`` / ``lop3`` on two packed words at a time with
the constants of ``pair_operands``; Triton's interpreter cannot run PTX, so the CPU kernel tests take the
plain-Triton branch. This test emulates those PTX instructions bit for bit (PTX ISA semantics) on words of
``to_kernel_layout`` built from random codes, and checks that every slice ``j`` yields, in each 16-bit half,
the magic number ored with the code of channel ``32·j + c`` of that half's word row ``c``.
"""

import pytest
import torch
from rosaq_kernels.fused_linear import pair_operands
from rosaq_kernels.packing import pack
from rosaq_kernels.tile_layout import SLICE, SLICES, TILE, to_kernel_layout

M32 = 0xFFFFFFFF
MAGICS = (0x64006400, 0x43004300)  # fp16 1024 + c, bf16 128 + c


def prmt(a: int, b: int, sel: int) -> int:
    """``prmt.b32 d, a, b, sel`` (default mode): byte i of d is byte ``sel[4i..4i+2]`` of b:a (bit 3: sign fill)."""
    src = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    out = 0
    for i in range(4):
        nib = (sel >> (4 * i)) & 0xF
        byte = src[nib & 7]
        if nib & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def lop3_ea(a: int, b: int, c: int) -> int:
    """``lop3.b32 d, a, b, c, 0xEA``: (a & b) | c."""
    return ((a & b) | c) & M32


def pair(w0: int, w1: int, j: int, bits: int, magic: int) -> int:
    sel, shift = pair_operands(bits, j)
    t = (prmt(w0, w1, sel) & M32) >> shift
    return lop3_ea(t, ((1 << bits) - 1) * 0x00010001, magic)


@pytest.mark.parametrize("bits", [4, 3])
def test_pair_extraction_matches_tile_layout(bits):
    gen = torch.Generator().manual_seed(7 + bits)
    n_rows = 3
    K = TILE[bits] + SLICE * 3  # one full tile and a padded one
    codes = torch.randint(0, 2**bits, (n_rows, K), generator=gen)
    kw = to_kernel_layout(pack(codes, bits), bits, K)  # [words, N] int32, words of tile t at rows 32·t ..
    words_per_tile = kw.shape[0] // 2
    padded = torch.nn.functional.pad(codes, (0, 2 * TILE[bits] - K))
    for n in range(n_rows):
        for tile in range(2):
            col = kw[tile * words_per_tile : (tile + 1) * words_per_tile, n].tolist()
            for c in range(0, SLICE, 2):  # the two elements of one asm instance: word rows c and c + 1
                w0, w1 = col[c] & M32, col[c + 1] & M32
                for j in range(SLICES[bits]):
                    want = [int(padded[n, tile * TILE[bits] + SLICE * j + c + e]) for e in (0, 1)]
                    for magic in MAGICS:
                        r = pair(w0, w1, j, bits, magic)
                        got = [(r & 0xFFFF) ^ (magic & 0xFFFF), (r >> 16) ^ (magic >> 16)]
                        assert got == want, f"INT{bits} tile {tile} row {c} slice {j}: {got} != {want}"
