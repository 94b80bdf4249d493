"""``torch.ops.rosaq.linear``: the ROSAQ linear as a torch custom op with a fake implementation.

The op body runs eagerly at every call (or once per captured size under CUDA graphs), so any
shape-based dispatch belongs here, never in the caller: vLLM's compilation freezes Python branches
of the model code. CUDA tensors go to the fused Triton kernel (which picks its launch configuration by M), or from
``MACHETE_MIN_M`` rows on to vLLM's Machete where the layer has Machete's copy of its weights
(``rosaq_kernels.machete``); everything else to the torch reference.
"""

import torch
from rosaq_kernels.machete import MACHETE_MIN_M, machete_linear
from rosaq_kernels.reference import rosaq_linear_reference


@torch.library.custom_op("rosaq::linear", mutates_args=())
def rosaq_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor,
    salient_idx: torch.Tensor,
    salient_weight: torch.Tensor,
    rot: torch.Tensor | None,
    bits: int,
    group_size: int,
    kernel_layout: bool = False,
    machete_qweight: torch.Tensor | None = None,
    machete_scales: torch.Tensor | None = None,
    machete_zeros: torch.Tensor | None = None,
) -> torch.Tensor:
    """ROSAQ linear without bias: ``x [M, K]`` to ``[M, N]`` in ``x.dtype`` (see ``reference``).

    ``qweight`` in the checkpoint's packing, or (``kernel_layout``) in the tile-interleaved layout of
    ``rosaq_kernels.fused_linear.prepare_weights`` (what serving passes). ``machete_*``: the layer's copy in
    Machete's layout (``rosaq_kernels.machete.machete_weights``), used from ``MACHETE_MIN_M`` rows on.
    """
    if machete_qweight is not None and x.shape[0] >= MACHETE_MIN_M and x.dtype == machete_scales.dtype:
        return machete_linear(x, machete_qweight, machete_scales, machete_zeros, salient_idx, salient_weight, rot,
                              group_size)
    if x.is_cuda:
        from rosaq_kernels.fused_linear import rosaq_fused_linear

        return rosaq_fused_linear(x, qweight, scales, qzeros, salient_idx, salient_weight, rot, bits, group_size,
                                  kernel_layout=kernel_layout)
    if kernel_layout:
        from rosaq_kernels.tile_layout import from_kernel_layout

        qweight = from_kernel_layout(qweight, bits, x.shape[1])
    return rosaq_linear_reference(x, qweight, scales, qzeros, salient_idx, salient_weight, rot, bits, group_size)


@rosaq_linear.register_fake
def _rosaq_linear_fake(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor,
    salient_idx: torch.Tensor,
    salient_weight: torch.Tensor,
    rot: torch.Tensor | None,
    bits: int,
    group_size: int,
    kernel_layout: bool = False,
    machete_qweight: torch.Tensor | None = None,
    machete_scales: torch.Tensor | None = None,
    machete_zeros: torch.Tensor | None = None,
) -> torch.Tensor:
    # Output features: qweight is [N, packed K] in the checkpoint's packing, [words, N] in the kernel layout.
    return x.new_empty((x.shape[0], qweight.shape[1] if kernel_layout else qweight.shape[0]))
