"""The inline-PTX pair extraction of the fused kernel, emulated on the CPU against the tile layout.

On the GPU ``_magic_slice`` runs ``prmt`` / ``shr`` / ``lop3`` on two packed words at a time with
the constants of ``pair_operands`` and ``kept_shift``; Triton's interpreter cannot run PTX, so the CPU kernel tests
take the plain-Triton branch. This test emulates those PTX instructions bit for bit (PTX ISA semantics) on words of
``to_kernel_layout`` built from random codes, and checks that every slice ``j`` yields, in each 16-bit half,
the magic number ored with the code of channel ``32·j + c`` of that half's word row ``c``, shifted up by the
slice's kept shift; and that ``_code_minus_zero``'s multiply-add turns every such half into ``code - zero`` exactly.
"""

import pytest
import torch
from rosaq_kernels.fused_linear import kept_shift, pair_operands
from rosaq_kernels.packing import pack
from rosaq_kernels.tile_layout import SLICE, SLICES, TILE, to_kernel_layout

M32 = 0xFFFFFFFF
MAGICS = {0: 0x64006400, 1: 0x43004300}  # by activation kind: fp16 1024 + c, bf16 128 + c
DTYPES = {0: torch.float16, 1: torch.bfloat16}


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


def pair(w0: int, w1: int, j: int, bits: int, act: int) -> int:
    """``_PAIR_ASM`` with ``_magic_slice``'s operands: prmt, shr by the shift not kept, lop3 (mask, magic)."""
    sel, shift = pair_operands(bits, j)
    kept = kept_shift(bits, j, act, True)
    t = (prmt(w0, w1, sel) & M32) >> (shift - kept)
    return lop3_ea(t, (((1 << bits) - 1) << kept) * 0x00010001, MAGICS[act])


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
                    for act, magic in MAGICS.items():
                        kept = kept_shift(bits, j, act, True)
                        r = pair(w0, w1, j, bits, act)
                        got = [(r & 0xFFFF) ^ (magic & 0xFFFF), (r >> 16) ^ (magic >> 16)]
                        assert got == [v << kept for v in want], f"INT{bits} tile {tile} row {c} slice {j}: {got}"


def test_kept_shifts_save_the_shift_where_the_mantissa_allows():
    # fp16 (10 mantissa bits): every INT4 slice and every INT3 slice keep their offset; bf16 (7) only those that fit.
    assert [kept_shift(4, j, 0, True) for j in range(8)] == [0, 4] * 4
    assert [kept_shift(3, j, 0, True) for j in range(10)] == [0, 3, 6, 1, 4, 7, 2, 5, 0, 3]
    assert [kept_shift(4, j, 1, True) for j in range(8)] == [0] * 8
    assert [kept_shift(3, j, 1, True) for j in range(10)] == [0, 3, 0, 1, 4, 0, 2, 0, 0, 3]
    assert kept_shift(3, 1, 0, True, keep=False) == 0 and kept_shift(3, 1, 1, False) == 0  # interpreter's bf16


@pytest.mark.parametrize("act", [0, 1])
@pytest.mark.parametrize("bits", [4, 3])
def test_code_minus_zero_multiply_add_is_exact(bits, act):
    """``fma(magic + c·2^k, 2^-k, (magic - magic·2^-k) - (magic + z))`` is ``c - z`` with every operand exact.

    Each term is representable in the activation dtype, so the hardware's one rounding (of an exact integer) is
    exact too; checked for every code, zero point and kept shift the kernel uses.
    """
    dtype, magic = DTYPES[act], (1024, 128)[act]
    kepts = {kept_shift(bits, j, act, True) for j in range(8 if bits == 4 else 10)}
    c = torch.arange(2**bits, dtype=torch.float64)[:, None]
    z = torch.arange(2**bits, dtype=torch.float64)[None, :]

    def exact(t: torch.Tensor) -> torch.Tensor:
        assert torch.equal(t.to(dtype).to(torch.float64), t), "not representable"
        return t

    for k in kepts:
        v = exact(magic + c * 2**k)  # the asm's half: magic | c << k
        magic_zero = exact(magic + z)
        offset = exact(torch.tensor(float(magic - (magic >> k)), dtype=torch.float64))
        addend = exact(offset - magic_zero)
        got = exact(exact(v * 2.0**-k) + addend) if k else exact(v - magic_zero)
        assert torch.equal(got, (c - z).expand_as(got)), f"INT{bits} act {act} kept {k}"
