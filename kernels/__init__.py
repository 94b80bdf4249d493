"""rosaq_kernels: packing, the torch reference and the fused kernels of ROSAQ linears.

Depends on torch (and triton for the GPU kernels) only; nothing else of this project.
"""

from rosaq_kernels.packing import pack, packed_width, unpack
from rosaq_kernels.reference import dequantize, rosaq_linear_reference, rotate_blocks

__all__ = [
    "dequantize",
    "pack",
    "packed_width",
    "rosaq_linear_reference",
    "rotate_blocks",
    "unpack",
]
