"""``RosaqLinearMethod``: parameters, loading checks, tensor-parallel slicing and ``apply`` of a ROSAQ linear.

Tensor parallelism: column-parallel layers (qkv, gate_up) see the whole input, so ``salient_idx`` and
``rot`` are replicated and everything with an output dimension is sliced along it. Row-parallel layers
(o_proj, down_proj) see a slice of the input: ``qweight``/``scales``/``qzeros`` and the blocks of ``rot``
are sliced along the input, and after loading each rank keeps the salient channels that fall into its
slice (their partial products are summed by the all-reduce like the rest).

On a Hopper GPU a W4 layer also keeps Machete's copy of its INT4 weights for large M
(``rosaq_kernels.machete``).

The checkpoint's zero points are packed along the outputs (``[K/g, N·bits/32]``); the loader unpacks each
projection's tensor to uint8 ``[N, K/g]`` before vLLM slices it, so they shard exactly like ``scales``.
"""

from collections.abc import Callable
from typing import Any

import rosaq_kernels.ops  # noqa: F401  (registers torch.ops.rosaq.linear)
import torch
from rosaq_kernels.packing import packed_width, unpack_zeros
from vllm.distributed import get_tensor_model_parallel_rank
from vllm.model_executor.layers.linear import LinearMethodBase, register_weight_loader_v2_supported_method
from vllm.model_executor.parameter import (
    BasevLLMParameter,
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    ModelWeightParameter,
    RowvLLMParameter,
)

from rosaq_vllm.checkpoint import SALIENT_MULTIPLE, CheckpointError, RosaqQuantConfig, check_tensor_values

_REPLICATED = ("salient_idx", "rot")
_FIX = "Re-quantize the model with rosaq-quantize, or check that the checkpoint matches its config.json."


@register_weight_loader_v2_supported_method
class RosaqLinearMethod(LinearMethodBase):
    """Linear method for one (possibly fused) ROSAQ projection.

    Args:
        quant_config: the checkpoint's ``quantization_config``.
        prefix: vLLM module name (e.g. ``model.layers.0.self_attn.qkv_proj``), used in error messages.
        projections: checkpoint projections fused into this layer (e.g. ``[q_proj, k_proj, v_proj]``).
    """

    def __init__(self, quant_config: RosaqQuantConfig, prefix: str, projections: list[str]) -> None:
        self.quant_config = quant_config
        self.prefix = prefix
        self.projections = projections

    def _error(self, name: str, problem: str, fix: str = _FIX) -> CheckpointError:
        return CheckpointError(f"{self.prefix}.{name}: {problem}. {fix}")

    def _checked_loader(self, layer: torch.nn.Module, name: str, loader: Callable) -> Callable:
        """Wrap vLLM's loader: check dtype, shape and finite values, and count the loads of ``name``."""

        def load(param: BasevLLMParameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
            where = name if shard_id is None else f"{name} (shard {shard_id})"
            stored_dtype = torch.int32 if name == "qzeros" else param.dtype
            if loaded.dtype != stored_dtype:
                raise self._error(where, f"dtype {loaded.dtype}, expected {stored_dtype}")
            check_tensor_values(f"{self.prefix}.{where}", loaded)  # the data is in memory here anyway
            if name == "qzeros":  # [K/g, packed N] -> uint8 [N, K/g], sliced below like the scales
                loaded = unpack_zeros(loaded, self.quant_config.bits)
            is_copy = name in _REPLICATED and layer.rosaq_loaded[name]
            if is_copy and not torch.equal(param.data, loaded.to(param.device)):
                raise self._error(where, f"differs between {self.projections}, which share one input")
            try:
                if shard_id is None:
                    loader(param, loaded)
                else:
                    loader(param, loaded, shard_id)
            except AssertionError as exc:
                raise self._error(where, f"shape {tuple(loaded.shape)} does not fit the layer's "
                                  f"{tuple(param.shape)} (tensor-parallel slice)") from exc
            layer.rosaq_loaded[name] += 1

        return load

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs: Any,
    ) -> None:
        cfg = self.quant_config
        in_local, out_local = input_size_per_partition, sum(output_partition_sizes)
        tp_hint = "This can be caused by too large a tensor_parallel_size; reduce it."
        if in_local % cfg.group_size or in_local % 32:
            raise self._error("qweight", f"the {in_local} input channels of this tensor-parallel slice are not "
                              f"divisible by group_size {cfg.group_size} (and 32)", tp_hint)
        num_salient = cfg.num_salient_for(input_size)
        block = cfg.rotation_block_for(self.projections[0], input_size)
        if block is not None and in_local % block:
            raise self._error("rot", f"rotation block {block} does not divide the {in_local} input channels of "
                              "this tensor-parallel slice", tp_hint)
        loader = extra_weight_attrs["weight_loader"]
        layer.rosaq_loaded = {}
        groups = in_local // cfg.group_size

        def register(name: str, param: BasevLLMParameter) -> None:
            param.weight_loader = self._checked_loader(layer, name, loader)
            layer.rosaq_loaded[name] = 0
            layer.register_parameter(name, param)

        def empty(*shape: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.empty(*shape, dtype=dtype)

        register("qweight", ModelWeightParameter(data=empty(out_local, packed_width(in_local, cfg.bits),
                                                            dtype=torch.int32),
                                                 input_dim=1, output_dim=0, weight_loader=loader))
        register("scales", GroupQuantScaleParameter(data=empty(out_local, groups, dtype=torch.float16),
                                                    input_dim=1, output_dim=0, weight_loader=loader))
        register("qzeros", GroupQuantScaleParameter(data=empty(out_local, groups, dtype=torch.uint8),
                                                    input_dim=1, output_dim=0, weight_loader=loader))
        register("salient_idx", BasevLLMParameter(data=empty(num_salient, dtype=torch.int32), weight_loader=loader))
        register("salient_weight", ChannelQuantScaleParameter(data=empty(out_local, num_salient,
                                                                         dtype=torch.float16),
                                                              output_dim=0, weight_loader=loader))
        if block is not None:
            register("rot", RowvLLMParameter(data=empty(in_local // block, block, block, dtype=torch.float32),
                                             input_dim=0, weight_loader=loader))
        layer.rosaq_input_size = input_size
        layer.rosaq_input_offset = 0 if in_local == input_size else get_tensor_model_parallel_rank() * in_local
        layer.rosaq_params_dtype = params_dtype

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Check every tensor arrived, keep this rank's salient channels, and freeze plain tensors."""
        expected = len(self.projections)
        for name, count in layer.rosaq_loaded.items():
            if count != expected:
                raise self._error(name, f"missing from the checkpoint (loaded for {count} of {expected} "
                                  f"projections {self.projections})")
        idx = layer.salient_idx.data.long()
        if idx.numel() and (idx.min() < 0 or idx.max() >= layer.rosaq_input_size or (idx.diff() <= 0).any()):
            raise self._error("salient_idx", f"indices must be ascending and in [0, {layer.rosaq_input_size})")
        in_local = layer.scales.shape[1] * self.quant_config.group_size
        local = (idx >= layer.rosaq_input_offset) & (idx < layer.rosaq_input_offset + in_local)
        salient_idx = (idx[local] - layer.rosaq_input_offset).to(torch.int32)
        salient_weight = layer.salient_weight.data[:, local]
        # Pad this rank's salient channels to whole 16-channel tiles (index 0 with zero weight adds 0).
        pad = -salient_idx.numel() % SALIENT_MULTIPLE
        salient_idx = torch.cat([salient_idx, salient_idx.new_zeros(pad)])
        salient_weight = torch.cat([salient_weight, salient_weight.new_zeros(salient_weight.shape[0], pad)], dim=1)
        tensors = {"qweight": layer.qweight.data, "scales": layer.scales.data, "qzeros": layer.qzeros.data,
                   "salient_idx": salient_idx, "salient_weight": salient_weight,
                   "rot": layer.rot.data if "rot" in layer.rosaq_loaded else None}
        del layer.rosaq_loaded
        self.kernel_layout = layer.qweight.is_cuda
        machete = None
        if self.kernel_layout:  # the fused Triton kernel's layout (rosaq_kernels.fused_linear.prepare_weights)
            from rosaq_kernels.fused_linear import prepare_weights
            from rosaq_kernels.machete import machete_weights

            bits, group_size = self.quant_config.bits, self.quant_config.group_size
            machete = machete_weights(tensors["qweight"], tensors["scales"], tensors["qzeros"], bits, group_size,
                                      layer.rosaq_params_dtype)
            tensors = prepare_weights(**tensors, bits=bits, group_size=group_size, rot_dtype=layer.rosaq_params_dtype)
        # Large-M copy of the INT4 weights for vLLM's Machete (Hopper, W4; rosaq_kernels.machete), else None.
        tensors.update(machete or dict.fromkeys(("machete_qweight", "machete_scales", "machete_zeros")))
        for name, data in tensors.items():
            value = None if data is None else torch.nn.Parameter(data, requires_grad=False)
            setattr(layer, name, value)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        args = (flat, layer.qweight, layer.scales, layer.qzeros, layer.salient_idx, layer.salient_weight, layer.rot,
                self.quant_config.bits, self.quant_config.group_size)
        y = torch.ops.rosaq.linear(*args, self.kernel_layout, layer.machete_qweight, layer.machete_scales,
                                   layer.machete_zeros)
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], y.shape[-1])
