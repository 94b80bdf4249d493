"""Compile the fused ROSAQ kernel for a Hopper GPU on a machine without one, and count what its K loop executes.

    python benchmarks/sass_stats.py [--bits 4 3] [--ms 1,16,32,64,128] [--dtype fp16] [--shape 4096x12288]
    PYTHONPATH=/path/to/triton-3.6.0:$PYTHONPATH python benchmarks/sass_stats.py   # the GPU image's Triton

For each M bucket of the launch table (``rosaq_kernels.fused_linear._CONFIGS``; the dequantize + cuBLAS rows
have no fused loop and are skipped), ``_rosaq_linear_kernel`` is compiled by the installed Triton and its own
``ptxas`` for ``sm_90a`` with the specializations Triton's JIT gives a real call (strides of 1 as constants;
pointers, shapes and the other strides divisible by 16), the cubin's resource usage is read with
``cuobjdump``, and its SASS is split at the backward branches: the K loop is the longest loop body. Printed per
config: registers, local memory (spills), shared memory, the programs one SM holds (H100 / H200 limits), the kernel's
static instruction count (everything outside the K loop runs once per program), the K loop's instructions per K step,
the ``cp.async`` copies in the kernel's TTGIR (none: Triton software-pipelined no loop) and the K loop's opcodes.

Instruction counts are what an A/B on the GPU cannot show (BENCHMARKS.md uses them to explain timings), and they
need no GPU. They are Triton-version specific: the GPU image runs Triton 3.6.0, this repo's CPU venv a newer
one; put the matching wheel first on ``PYTHONPATH`` when the numbers must match the GPU's.
"""

from __future__ import annotations

import argparse
import collections
import inspect
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
from rosaq_kernels.fused_linear import _CONFIGS, _linear_constexprs, _pick_config, _rosaq_linear_kernel
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

_POINTERS = {  # argument -> element type (activation-typed ones get the activation dtype)
    "x_ptr": "act", "qw_ptr": "i32", "sc_ptr": "fp16", "zp_ptr": "i16", "sidx_ptr": "i32", "sw_ptr": "fp16",
    "y_ptr": "act", "part_ptr": "fp32", "counter_ptr": "i32",
}
#: Strides that are 1 in the serving layout (x and y row-major, scales and zero points column-major, salient
#: weights row-major, partial sums contiguous): Triton's JIT turns them into constants.
_UNIT_STRIDES = ("stride_xk", "stride_sn", "stride_zn", "stride_ws", "stride_yn", "stride_pn")
#: Arguments Triton's JIT does not specialize (``do_not_specialize`` of the kernel).
_UNSPECIALIZED = ("M", "k_tiles", "steps_per_split", "SPLIT_K")
_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)(\.[A-Z0-9_.]+)?\s*([^;]*);")


#: Per-SM limits of sm_90 (H100 / H200): registers, shared memory (bytes, of which 1 KB per program is reserved by
#: the driver), resident warps.
_SM_REGISTERS, _SM_SHARED, _BLOCK_RESERVED_SHARED, _SM_WARPS = 65536, 233472, 1024, 64


@dataclass
class LoopStats:
    """Resources of one compiled kernel and the opcodes of its K loop."""

    registers: int  # per thread
    local_bytes: int  # per thread (register spills)
    shared_bytes: int  # per program
    programs_per_sm: int
    total_instructions: int  # static count of the whole kernel (the loop once): prologue, salient part, epilogue
    loop_instructions: int
    opcodes: collections.Counter[str]  # of the K loop
    sequence: list[str]  # the whole kernel's opcodes in address order
    async_copies: int  # cp.async copies in the whole kernel's TTGIR (0: no loop is software-pipelined)


def compile_for_hopper(M: int, N: int, K: int, bits: int, dtype: torch.dtype, config: tuple[int, ...] | None = None,
                       group_size: int = 128) -> triton.compiler.CompiledKernel:
    """The fused kernel compiled for sm_90a for one call shape and launch ``config`` (a ``_CONFIGS`` row's tail;
    ``None``: the launch table's row for ``M``), with the constants the real launch passes.

    Raises ``ValueError`` for a config without a fused loop (``BLOCK_M == 0``: dequantize + cuBLAS).
    """
    bm, bn, warps, stages, swap, late, _, tps, _, split = _pick_config(
        M, N, K, bits, group_size, torch.device("cpu"), config
    )
    if bm == 0:
        raise ValueError(f"M={M}: the launch dequantizes and calls cuBLAS, no fused loop to compile")
    constants = _linear_constexprs(bits, group_size, dtype, K, bm, bn, swap, late, tps, split, True) | dict(
        COMPILED=True, **dict.fromkeys(_UNIT_STRIDES, 1)
    )
    names = list(inspect.signature(_rosaq_linear_kernel.fn).parameters)
    unknown = (set(constants) | set(_POINTERS) | set(_UNSPECIALIZED)) - set(names)
    if unknown:
        raise RuntimeError(f"the kernel has no parameters {sorted(unknown)}: update benchmarks/sass_stats.py")
    if N % 16 or K % 16:  # the salient count always is (SALIENT_BLOCK)
        raise ValueError("N and K must be multiples of 16 (as the divisibility hints say)")
    signature = {}
    for name in names:
        if name in constants:
            signature[name] = "constexpr"
        elif name in _POINTERS:
            kind = _POINTERS[name]
            signature[name] = "*" + (_TYPES[dtype] if kind == "act" else kind)
        else:
            signature[name] = "i32"
    divisible = [n for n in names if n not in constants and n not in _UNSPECIALIZED]
    source = ASTSource(
        _rosaq_linear_kernel, signature,
        constexprs={(names.index(n),): v for n, v in constants.items()},
        attrs={(names.index(n),): [["tt.divisibility", 16]] for n in divisible},
    )  # fmt: skip
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})


def _cuobjdump(cubin: bytes, flag: str) -> str:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        return subprocess.run([str(tool), flag, file.name], capture_output=True, text=True, check=True).stdout


def loop_stats(kernel: triton.compiler.CompiledKernel) -> LoopStats:
    """Resources of ``kernel`` and its longest loop body's instruction count and opcodes."""
    cubin = kernel.asm["cubin"]
    usage = _cuobjdump(cubin, "--dump-resource-usage")
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    local_bytes = int(re.search(r"LOCAL:(\d+)", usage).group(1))
    shared = kernel.metadata.shared
    warps = kernel.metadata.num_warps
    programs = min(_SM_REGISTERS // (registers * 32 * warps), _SM_WARPS // warps,
                   _SM_SHARED // (shared + _BLOCK_RESERVED_SHARED))
    instructions = [(int(m.group(1), 16), m.group(2), m.group(4))
                    for m in map(_SASS_LINE.search, _cuobjdump(cubin, "-sass").splitlines()) if m]
    loops = []  # (start, end) address of each backward branch's body
    for address, opcode, operands in instructions:
        target = re.match(r"\s*(?:`\()?(?:\.L_x_\d+|0x([0-9a-f]+))", operands) if opcode == "BRA" else None
        if target and target.group(1) and int(target.group(1), 16) <= address:
            loops.append((int(target.group(1), 16), address))
    if not loops:
        raise ValueError("no loop in the kernel's SASS")
    start, end = max(loops, key=lambda span: span[1] - span[0])
    body = [opcode for address, opcode, _ in instructions if start <= address <= end]
    return LoopStats(registers, local_bytes, shared, programs, len(instructions), len(body), collections.Counter(body),
                     [opcode for _, opcode, _ in instructions], kernel.asm["ttgir"].count("async_copy_global_to_local"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", nargs="+", type=int, default=[4, 3], choices=(3, 4))
    parser.add_argument("--ms", default="1,16,32,64,128", help="M buckets of the launch table (comma-separated)")
    parser.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16")
    parser.add_argument("--shape", default="4096x12288", help="K x N of the call (default: Llama-2-7B qkv)")
    parser.add_argument("--top", type=int, default=12, help="opcodes listed per config")
    args = parser.parse_args()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    K, N = (int(v) for v in args.shape.split("x"))
    print(f"triton {triton.__version__}, sm_90a, {args.dtype}, K={K} N={N}")
    print("| bits | M | config | registers | local bytes | shared KB | programs per SM | kernel instructions | "
          "K-loop instructions | async copies | top opcodes |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for bits in args.bits:
        for M in (int(m) for m in args.ms.split(",")):
            config = next(row[1:] for row in _CONFIGS[bits] if M <= row[0])
            if config[0] == 0:
                print(f"| {bits} | {M} | {config} | – | – | – | – | – | – | – | dequantize + cuBLAS |")
                continue
            stats = loop_stats(compile_for_hopper(M, N, K, bits, dtype, config))
            top = ", ".join(f"{op} {n}" for op, n in stats.opcodes.most_common(args.top))
            print(f"| {bits} | {M} | {config} | {stats.registers} | {stats.local_bytes} | "
                  f"{stats.shared_bytes / 1024:.1f} | {stats.programs_per_sm} | {stats.total_instructions} | "
                  f"{stats.loop_instructions} | {stats.async_copies} | {top} |")


if __name__ == "__main__":
    main()
