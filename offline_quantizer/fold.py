"""Fold RMSNorm scales into the following linears and untie the embeddings.

After folding every RMSNorm is weightless (γ = 1), so it commutes with orthogonal rotations of
the residual stream: ``RMSNorm(h·Q) = RMSNorm(h)·Q``.
"""

import torch
from torch import nn

from offline_quantizer.adapters import ATTN_IN, MLP_IN, DecoderAdapter


def untie_lm_head(adapter: DecoderAdapter) -> None:
    """Give ``lm_head`` its own weight (ROSAQ rotates the embedding and the head differently)."""
    model = adapter.model
    if adapter.lm_head.weight is adapter.embedding.weight or model.config.tie_word_embeddings:
        adapter.lm_head.weight = nn.Parameter(adapter.embedding.weight.detach().clone())
    model.config.tie_word_embeddings = False
    if hasattr(model, "_tied_weights_keys"):
        model._tied_weights_keys = None


@torch.no_grad()
def _fold_norm(norm: nn.Module, linears: list[nn.Linear]) -> None:
    gamma = norm.weight.detach().to(torch.float64)
    for linear in linears:
        linear.weight.copy_((linear.weight.to(torch.float64) * gamma).to(linear.weight.dtype))
    norm.weight.fill_(1.0)


def fold_layer_norms(adapter: DecoderAdapter, layer: nn.Module) -> None:
    """Fold one decoder layer's two RMSNorm γ into q/k/v and gate/up."""
    _fold_norm(layer.input_layernorm, [adapter.projection(layer, p) for p in ATTN_IN])
    _fold_norm(layer.post_attention_layernorm, [adapter.projection(layer, p) for p in MLP_IN])


def fold_final_norm(adapter: DecoderAdapter) -> None:
    """Untie the embeddings and fold the final RMSNorm γ into lm_head."""
    untie_lm_head(adapter)
    _fold_norm(adapter.final_norm, [adapter.lm_head])


def fold_norms(adapter: DecoderAdapter) -> None:
    """Fold every RMSNorm γ into the linears it feeds (q/k/v, gate/up, lm_head)."""
    fold_final_norm(adapter)
    for layer in adapter.layers:
        fold_layer_norms(adapter, layer)
