"""``RosaqConfig``: vLLM's view of a ROSAQ checkpoint's ``quantization_config``.

It only parses, validates and dispatches; the checkpoint format itself lives in ``checkpoint``.
"""

import logging
from pathlib import Path
from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase

from rosaq_vllm.checkpoint import QUANT_METHOD, QUANTIZED_LINEARS, RosaqQuantConfig, validate_checkpoint
from rosaq_vllm.linear_method import RosaqLinearMethod

logger = logging.getLogger(__name__)

#: vLLM's fused modules and the checkpoint projections they hold (used when a model sets no mapping).
_DEFAULT_PACKED_MODULES = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


@register_quantization_config(QUANT_METHOD)
class RosaqConfig(QuantizationConfig):
    """ROSAQ: fp16 salient channels plus INT4/INT3 groups in a rotated (PCA) basis."""

    def __init__(self, quant_config: RosaqQuantConfig | None = None) -> None:
        super().__init__()
        self.quant_config = quant_config or RosaqQuantConfig()

    def __repr__(self) -> str:
        return f"RosaqConfig({self.quant_config})"

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float16, torch.bfloat16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return -1  # the torch reference path runs on any device

    @staticmethod
    def get_config_filenames() -> list[str]:
        return ["rosaq_config.json"]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "RosaqConfig":
        return cls(RosaqQuantConfig.from_dict(config))

    def maybe_update_config(self, model_name: str, *args: Any, **kwargs: Any) -> None:
        """Validate a local checkpoint's tensors (names, shapes, dtypes, truncation) before loading any."""
        if Path(model_name, "config.json").is_file():
            validate_checkpoint(model_name)

    def _projections(self, prefix: str) -> list[str]:
        name = prefix.rsplit(".", 1)[-1]
        mapping = self.packed_modules_mapping or _DEFAULT_PACKED_MODULES
        return list(mapping.get(name, [name]))

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if not isinstance(layer, LinearBase):
            return None
        projections = self._projections(prefix)
        if all(p in QUANTIZED_LINEARS for p in projections):
            return RosaqLinearMethod(self.quant_config, prefix, projections)
        logger.debug("rosaq: %s is not quantized", prefix)
        return UnquantizedLinearMethod()
