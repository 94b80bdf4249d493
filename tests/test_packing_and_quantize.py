"""INT4/INT3 packing, group quantization and salient channels, against float64 references."""

import pytest
import torch
from rosaq_kernels.packing import pack, pack_zeros, packed_width, unpack, unpack_zeros
from rosaq_kernels.reference import dequantize, rosaq_linear_reference, rotate_blocks

from offline_quantizer.quantize import CLIP_NORM, CLIP_SHRINKS, group_params, quantize_groups, quantize_linear
from offline_quantizer.saliency import salient_priority, select_salient


@pytest.mark.parametrize("bits", [3, 4])
def test_pack_unpack_round_trip(bits: int) -> None:
    codes = torch.randint(0, 2**bits, (7, 256), generator=torch.Generator().manual_seed(bits))
    packed = pack(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (7, packed_width(256, bits)) == (7, 256 * bits // 32)
    assert torch.equal(unpack(packed, bits), codes.to(torch.int32))


@pytest.mark.parametrize("bits,groups", [(3, 9), (4, 7), (4, 1)])
def test_zero_points_pack_along_the_outputs_at_the_code_width(bits: int, groups: int) -> None:
    """Any group count (SmolLM2: 9 groups of 64): the packing runs along the 96 outputs, ``bits`` per zero point."""
    zeros = torch.randint(0, 2**bits, (96, groups), generator=torch.Generator().manual_seed(groups), dtype=torch.uint8)
    packed = pack_zeros(zeros, bits)
    assert packed.dtype == torch.int32 and packed.shape == (groups, 96 * bits // 32)
    assert torch.equal(unpack_zeros(packed, bits), zeros)
    assert torch.equal(unpack(packed, bits).t(), zeros.to(torch.int32))  # qweight's packing, along N


def test_int3_chunks_are_self_contained() -> None:
    """Slicing the input at a multiple of 32 channels slices the packed words (tensor parallelism)."""
    codes = torch.randint(0, 8, (3, 128))
    packed = pack(codes, 3)
    assert torch.equal(unpack(packed[:, 6:], 3), codes[:, 64:].to(torch.int32))


@pytest.mark.parametrize("bits,in_features", [(4, 12), (3, 48)])
def test_packing_rejects_unaligned_width(bits: int, in_features: int) -> None:
    with pytest.raises(ValueError, match="divisible"):
        packed_width(in_features, bits)


@pytest.mark.parametrize("bits", [3, 4])
def test_group_quantization_error_within_half_step(bits: int) -> None:
    # seeded: the bound is not exact for every draw (a rounded zero point can shift a group's grid by up to half a
    # step, and an fp16 scale rounded down can clamp its largest weight), so an unseeded draw failed about 1 run in 15
    weight = torch.randn(16, 256, dtype=torch.float64, generator=torch.Generator().manual_seed(bits))
    codes, scales, zeros = quantize_groups(weight, bits, 64)
    assert codes.min() >= 0 and codes.max() < 2**bits
    deq = dequantize(pack(codes, bits), scales, zeros, bits, 64).to(torch.float64)
    step = scales.to(torch.float64).repeat_interleave(64, dim=1)
    assert ((deq - weight).abs() <= step / 2 * (1 + 1e-3) + 1e-6).all()


@pytest.mark.parametrize("bits", [3, 4])
def test_clip_search_picks_the_least_error_shrink_of_every_group(bits: int) -> None:
    """Heavy-tailed groups (Student-t weights): every group's clip-searched grid is the best of the candidate shrinks,
    recomputed here group by group in plain Python, and never worse than min/max; the quantizer uses it."""
    torch.manual_seed(bits)
    weight = torch.distributions.StudentT(3.0).sample((12, 4 * 64)).to(torch.float64)
    qmax = 2**bits - 1
    groups = weight.view(12, 4, 64)
    scale, zero = group_params(groups, qmax, clip=True)
    minmax_scale, minmax_zero = group_params(groups, qmax)

    def error(values: list[float], s: float, z: float) -> float:
        return sum(abs((min(max(round(v / s) + z, 0), qmax) - z) * s - v) ** CLIP_NORM for v in values)

    shrunk = 0
    for row in range(12):
        for g in range(4):
            values = groups[row, g].tolist()
            lo, hi = min(min(values), 0.0), max(max(values), 0.0)
            best = min(
                error(values, s, min(max(round(-lo * p / s), 0), qmax))
                for p in CLIP_SHRINKS
                for s in [float(torch.tensor((hi - lo) * p / qmax).half())]
            )
            chosen = error(values, scale[row, g].item(), zero[row, g].item())
            assert chosen == pytest.approx(best, rel=1e-9)
            assert chosen <= error(values, minmax_scale[row, g].item(), minmax_zero[row, g].item()) * (1 + 1e-12)
            shrunk += scale[row, g].item() < minmax_scale[row, g].item()
    assert shrunk > 0  # heavy tails: clipping pays somewhere
    codes, scales, zeros = quantize_groups(weight, bits, 64, clip=True)
    assert torch.equal(scales, scale.to(torch.float16)) and torch.equal(zeros, zero.to(torch.uint8))
    deq = dequantize(pack(codes, bits), scales, zeros, bits, 64).to(torch.float64)
    plain = quantize_groups(weight, bits, 64)
    deq_plain = dequantize(pack(plain[0], bits), plain[1], plain[2], bits, 64).to(torch.float64)
    assert (deq - weight).abs().pow(CLIP_NORM).sum() < (deq_plain - weight).abs().pow(CLIP_NORM).sum()


def test_group_size_not_dividing_input_is_an_error() -> None:
    with pytest.raises(ValueError, match="group_size 128 does not divide"):
        quantize_groups(torch.randn(4, 200), 4, 128)


@pytest.mark.parametrize("num_salient", [0, 16, 48])
def test_salient_columns_are_exact_and_quantized_part_is_zero_there(num_salient: int) -> None:
    torch.manual_seed(num_salient)
    weight = torch.randn(32, 128, dtype=torch.float64)
    energy = torch.rand(128, dtype=torch.float64)
    idx = select_salient(energy, num_salient)
    assert idx.numel() == num_salient and bool((idx.diff() > 0).all())
    assert set(idx.tolist()) == set(torch.topk(energy, num_salient).indices.tolist())
    tensors = quantize_linear(weight, idx, 4, 32)
    deq = dequantize(tensors["qweight"], tensors["scales"], unpack_zeros(tensors["qzeros"], 4), 4, 32)
    assert torch.equal(deq[:, idx.long()], torch.zeros(32, num_salient))
    torch.testing.assert_close(tensors["salient_weight"].to(torch.float64), weight[:, idx.long()],
                               rtol=1e-3, atol=1e-4)


def test_outliers_are_salient_first_by_their_energy() -> None:
    """Outlier channels come before every other channel; with more outliers than salient channels the ones of
    largest energy are kept (not the first indices of a tie)."""
    energy = torch.rand(64, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) + 0.5
    outliers = torch.zeros(64, dtype=torch.bool)
    outliers[[2, 9, 30, 41, 60]] = True
    energy[[2, 9, 30, 41, 60]] = torch.tensor([0.01, 0.3, 0.2, 0.05, 0.4], dtype=torch.float64)  # below the rest
    priority = salient_priority(energy, outliers)
    assert select_salient(priority, 3).tolist() == [9, 30, 60]
    with_rest = select_salient(priority, 8).tolist()
    assert set(with_rest) >= {2, 9, 30, 41, 60}
    assert set(with_rest) - {2, 9, 30, 41, 60} == set(torch.topk(energy.masked_fill(outliers, 0), 3).indices.tolist())


def test_all_channels_salient_is_rejected() -> None:
    with pytest.raises(ValueError, match="num_salient"):
        select_salient(torch.rand(64), 64)


def test_reference_linear_matches_float64_math() -> None:
    torch.manual_seed(0)
    n, k, s = 32, 128, 16
    weight = torch.randn(n, k, dtype=torch.float64)
    idx = select_salient(torch.rand(k), s)
    tensors = quantize_linear(weight, idx, 3, 32)
    rot = torch.linalg.qr(torch.randn(2, 64, 64, dtype=torch.float64)).Q
    x = torch.randn(5, k, dtype=torch.float64)
    y = rosaq_linear_reference(x.float(), tensors["qweight"], tensors["scales"], unpack_zeros(tensors["qzeros"], 3),
                               tensors["salient_idx"], tensors["salient_weight"], rot.float(), 3, 32)
    w_eff = dequantize(tensors["qweight"], tensors["scales"], unpack_zeros(tensors["qzeros"], 3), 3, 32).to(
        torch.float64)
    w_eff[:, idx.long()] = tensors["salient_weight"].to(torch.float64)
    x_rot = torch.cat([x[:, :64] @ rot[0], x[:, 64:] @ rot[1]], dim=1)
    torch.testing.assert_close(y.to(torch.float64), x_rot @ w_eff.t(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rotate_blocks(x.float(), rot.float()).double(), x_rot, rtol=1e-5, atol=1e-5)
