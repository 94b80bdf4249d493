"""Where a kernel's warps stall, from Nsight Compute's per-instruction samples, split at the kernel's K loop.

    ncu --clock-control none --set full --import-source no -k regex:_rosaq_linear -c 12 -o prof \\
        python benchmarks/profile_kernel.py --m 1 --bits 4
    ncu -i prof.ncu-rep --page source --csv --print-source sass > source.csv
    python benchmarks/ncu_stalls.py source.csv [--kernels 2,5,8,11] [--top 12]

For each profiled launch (numbered from 0 in profiling order): the share of its warp-state samples before, inside and
after its longest loop (the K loop: the longest backward branch), the stall reasons of each part as shares of all the
launch's samples, and the instructions with the most samples. Samples are taken per warp at a fixed interval, so a
part's share is its share of the warps' resident time; when all programs of a launch are resident at once (one wave,
as at M = 1) that is its share of the kernel's duration.
"""

from __future__ import annotations

import argparse
import collections
import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

_BRANCH = re.compile(r"\bBRA\b.*?0x([0-9a-f]+)")
REGIONS = ("before", "loop", "after")


@dataclass
class Instruction:
    address: int
    sass: str
    samples: int
    stalls: dict[str, int]  # stall reason (ncu's name without "stall_") -> samples


@dataclass
class Launch:
    name: str
    instructions: list[Instruction] = field(default_factory=list)


def read_source_page(path: Path) -> list[Launch]:
    """The launches of ``ncu --page source --csv --print-source sass`` output, in profiling order."""
    launches: list[Launch] = []
    header: list[str] = []
    with open(path, newline="") as file:
        for row in csv.reader(file):
            if not row:
                continue
            if row[0] == "Kernel Name":
                launches.append(Launch(row[1]))
            elif row[0] == "Address":
                header = row
            elif row[0].startswith("0x"):
                values = dict(zip(header, row, strict=True))
                stalls = {
                    name[len("stall_"):]: int(value or 0)
                    for name, value in values.items()
                    if name.startswith("stall_") and "Not Issued" not in name
                }
                launches[-1].instructions.append(
                    Instruction(int(row[0], 16), values["Source"].strip(), int(values["# Samples"] or 0), stalls)
                )
    return launches


def k_loop(instructions: list[Instruction]) -> tuple[int, int]:
    """``(first, last)`` address of the longest loop body: the backward branch spanning the most bytes."""
    loops = []
    for ins in instructions:
        match = _BRANCH.search(ins.sass)
        if match and int(match.group(1), 16) <= ins.address:
            loops.append((int(match.group(1), 16), ins.address))
    if not loops:
        raise ValueError("no backward branch: the launch has no loop")
    return max(loops, key=lambda span: span[1] - span[0])


def region_stalls(launch: Launch) -> dict[str, collections.Counter[str]]:
    """Samples per stall reason in each region (``before`` / ``loop`` / ``after`` the K loop); key ``"samples"``
    holds the region's total."""
    first, last = k_loop(launch.instructions)
    regions = {name: collections.Counter() for name in REGIONS}
    for ins in launch.instructions:
        region = regions["before" if ins.address < first else "loop" if ins.address <= last else "after"]
        region.update(ins.stalls)
        region["samples"] += ins.samples
    return regions


def report(launch: Launch, index: int, top: int) -> str:
    regions = region_stalls(launch)
    total = sum(r["samples"] for r in regions.values()) or 1
    lines = [f"launch {index} ({launch.name}): {total} samples"]
    for name, counts in regions.items():
        reasons = ", ".join(
            f"{reason} {100 * n / total:.1f} %"
            for reason, n in counts.most_common()
            if reason != "samples" and n >= 0.01 * total
        )
        lines.append(f"  {name:6s} {100 * counts['samples'] / total:5.1f} % of samples: {reasons}")
    for ins in sorted(launch.instructions, key=lambda i: -i.samples)[:top]:
        reasons = sorted(ins.stalls.items(), key=lambda kv: -kv[1])
        main = ", ".join(f"{r} {n}" for r, n in reasons if n >= 0.2 * ins.samples)
        lines.append(f"    {ins.address & 0xFFFFF:05x} {ins.samples:5d}  {ins.sass[:64]:64s} {main}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source_csv", type=Path)
    parser.add_argument("--kernels", default="", help="comma-separated launch numbers (default: all)")
    parser.add_argument("--top", type=int, default=12, help="instructions with the most samples to list")
    args = parser.parse_args()
    launches = read_source_page(args.source_csv)
    wanted = [int(k) for k in args.kernels.split(",")] if args.kernels else range(len(launches))
    print("\n".join(report(launches[k], k, args.top) for k in wanted))


if __name__ == "__main__":
    main()
