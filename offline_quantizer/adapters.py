"""Where the parts of a supported decoder-only model live (Llama, Qwen2, Mistral share one layout)."""

from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from rosaq_vllm.checkpoint import SUPPORTED_MODEL_TYPES

ATTN_IN = ("q_proj", "k_proj", "v_proj")
MLP_IN = ("gate_proj", "up_proj")


@dataclass(frozen=True)
class ModelShape:
    """Attention geometry of a model."""

    num_heads: int
    num_kv_heads: int
    head_dim: int


class DecoderAdapter:
    """Access to the embedding, decoder layers, norms and projections of a Hugging Face causal LM."""

    def __init__(self, model: nn.Module) -> None:
        model_type = model.config.model_type
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not supported; ROSAQ supports {SUPPORTED_MODEL_TYPES}")
        self.model = model
        cfg = model.config
        heads = cfg.num_attention_heads
        self.shape = ModelShape(
            num_heads=heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        )

    @property
    def embedding(self) -> nn.Embedding:
        return self.model.model.embed_tokens

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def iter_layers(self) -> Iterator[nn.Module]:
        """The decoder layers, in order, as the pipeline computes them (here: in place)."""
        yield from self.layers

    @property
    def final_norm(self) -> nn.Module:
        return self.model.model.norm

    @property
    def lm_head(self) -> nn.Linear:
        return self.model.lm_head

    @staticmethod
    def projection(layer: nn.Module, name: str) -> nn.Linear:
        """``q_proj`` … ``down_proj`` of one decoder layer."""
        block = layer.mlp if name in ("gate_proj", "up_proj", "down_proj") else layer.self_attn
        return getattr(block, name)
