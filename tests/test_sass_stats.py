"""The fused kernel compiles for Hopper (sm_90a, Triton's own ptxas) on this GPU-less machine, without spills.

The interpreter tests check what the kernel computes; only a real compile checks the inline PTX, the layouts
Triton picks for the tensor cores and the register budget, which otherwise fail first on the lent GPU. The
compile runs in a subprocess: the test session runs Triton in its interpreter (``tests/conftest.py``).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.sass_stats import compile_for_hopper

REPO = Path(__file__).resolve().parent.parent
#: SASS opcodes that access global (or generic) memory.
_GLOBAL_MEMORY_OPCODES = {"LDG", "STG", "LDGSTS", "ATOM", "ATOMG", "RED", "REDG", "LD", "ST"}
_COMPILE = """
import json, sys, torch
from benchmarks.sass_stats import compile_for_hopper, loop_stats
bits, M, dtype = int(sys.argv[1]), int(sys.argv[2]), getattr(torch, sys.argv[3])
stats = loop_stats(compile_for_hopper(M, 4096, 4096, bits, dtype))  # the launch table's row for M
print(json.dumps({"local": stats.local_bytes, "programs": stats.programs_per_sm, "total": stats.total_instructions,
                  "loop": stats.loop_instructions, "opcodes": dict(stats.opcodes), "sass": stats.sequence,
                  "async": stats.async_copies}))
"""


@pytest.mark.parametrize(("bits", "M", "dtype"), [(4, 1, "float16"), (3, 1, "bfloat16"), (4, 64, "bfloat16")])
def test_table_configs_compile_for_hopper_without_spills(bits: int, M: int, dtype: str) -> None:
    env = os.environ | {"TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    run = subprocess.run([sys.executable, "-c", _COMPILE, str(bits), str(M), dtype], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    stats = json.loads(run.stdout.strip().splitlines()[-1])
    opcodes = stats["opcodes"]
    assert stats["local"] == 0, f"register spills: {stats}"
    assert opcodes.get("HMMA", 0) + opcodes.get("HGMMA", 0) > 0, opcodes
    # codes are cut out of the words by bit operations (Marlin's magic numbers), not converted one by one (a
    # thread holds 128 W4 codes of a K tile; the few conversions left are of group parameters)
    assert opcodes.get("LOP3", 0) > 32 and opcodes.get("I2F", 0) < 16, opcodes
    assert 0 < stats["loop"] < stats["total"] and stats["programs"] >= 1
    assert stats["async"] > 0, "no cp.async in the kernel: Triton pipelined no loop"
    # programmatic dependent launch: the grid-dependency wait (ACQBULK) comes before the first global memory access
    memory = [i for i, op in enumerate(stats["sass"]) if op in _GLOBAL_MEMORY_OPCODES]
    assert "ACQBULK" in stats["sass"] and memory and stats["sass"].index("ACQBULK") < memory[0], stats["sass"][:40]


def test_large_m_rows_have_no_fused_loop() -> None:
    with pytest.raises(ValueError, match="no fused loop"):
        compile_for_hopper(1 << 20, 4096, 4096, 4, torch.float16)
