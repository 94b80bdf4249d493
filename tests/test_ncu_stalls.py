"""``benchmarks/ncu_stalls.py`` splits Nsight Compute's per-instruction stall samples at the K loop."""

import pytest

from benchmarks.ncu_stalls import k_loop, read_source_page, region_stalls, report

_HEADER = '"Address","Source","# Samples","stall_barrier","stall_long_sb","stall_wait","stall_long_sb (Not Issued)"'


def _row(address: int, sass: str, barrier: int, long_sb: int, wait: int) -> str:
    samples = barrier + long_sb + wait
    return f'"{address:#x}","      {sass}","{samples}","{barrier}","{long_sb}","{wait}","{long_sb + 99}"'


def _page(tmp_path, launches):
    lines = []
    for name, rows in launches:
        lines += [f'"Kernel Name","{name}",', _HEADER] + rows
    path = tmp_path / "source.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_samples_are_split_before_inside_and_after_the_longest_loop(tmp_path):
    base = 0x7F0000001000
    rows = [
        _row(base, "LDC R1, c[0x0][0x28]", 0, 0, 3),
        _row(base + 0x10, "LDG.E R2, desc[UR4][R4.64]", 0, 5, 0),
        _row(base + 0x20, "HMMA.16816.F32 R8, R12, R16, R8", 0, 7, 11),  # loop 1 (the longer)
        _row(base + 0x30, "BRA 0x7f0000001050", 0, 0, 0),  # forward: not a loop
        _row(base + 0x40, "@P0 BRA 0x7f0000001030", 0, 0, 1),  # short backward branch: an inner loop
        _row(base + 0x50, "@P1 BRA 0x7f0000001020", 0, 2, 0),  # end of loop 1
        _row(base + 0x60, "LDS R4, [UR4]", 13, 0, 0),
    ]
    path = _page(tmp_path, [("kernel_a", rows), ("kernel_b", rows[:3] + rows[5:])])
    launches = read_source_page(path)
    assert [launch.name for launch in launches] == ["kernel_a", "kernel_b"]
    assert len(launches[0].instructions) == 7 and len(launches[1].instructions) == 5
    assert k_loop(launches[0].instructions) == (base + 0x20, base + 0x50)
    regions = region_stalls(launches[0])
    assert regions["before"] == {"samples": 8, "wait": 3, "long_sb": 5, "barrier": 0}
    assert regions["loop"] == {"samples": 21, "wait": 12, "long_sb": 9, "barrier": 0}
    assert regions["after"] == {"samples": 13, "barrier": 13, "long_sb": 0, "wait": 0}  # "(Not Issued)" not counted
    text = report(launches[0], 0, top=2)
    assert "loop    50.0 % of samples" in text and "after   31.0 % of samples: barrier 31.0 %" in text
    assert [line.split()[1] for line in text.splitlines()[-2:]] == ["18", "13"]  # most samples first


def test_a_launch_without_a_loop_is_an_error(tmp_path):
    path = _page(tmp_path, [("flat", [_row(0x1000, "EXIT", 0, 0, 1)])])
    with pytest.raises(ValueError, match="no loop"):
        region_stalls(read_source_page(path)[0])
