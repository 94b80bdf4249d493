"""Calibration data: text to token batches, and streaming the batches through one decoder layer at a time."""

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from offline_quantizer.adapters import DecoderAdapter


def token_batches(
    tokenizer: Any, text: str, num_samples: int, seq_len: int, batch_size: int
) -> list[torch.Tensor]:
    """Cut the token stream of ``text`` into ``num_samples`` windows of ``seq_len`` tokens.

    Returns int64 batches ``[b, seq_len]``. Raises if the text is too short.
    """
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    available = ids.numel() // seq_len
    if available < num_samples:
        raise ValueError(f"calibration text has {ids.numel()} tokens: enough for {available} samples of "
                         f"{seq_len} tokens, but {num_samples} were requested; use more text or fewer samples")
    windows = ids[: num_samples * seq_len].view(num_samples, seq_len)
    return list(windows.split(batch_size))


class _StopForward(Exception):
    pass


@dataclass
class LayerInputs:
    """Hidden states entering a decoder layer, per batch, plus the keyword arguments the model passes
    to every layer (attention mask, position embeddings, …)."""

    hidden: list[torch.Tensor]
    layer_kwargs: list[dict[str, Any]]


@torch.no_grad()
def capture_first_layer_inputs(adapter: DecoderAdapter, batches: list[torch.Tensor]) -> LayerInputs:
    """Run the model up to its first decoder layer for every batch and record that layer's inputs."""
    hidden: list[torch.Tensor] = []
    layer_kwargs: list[dict[str, Any]] = []

    def catch(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        hidden.append(args[0] if args else kwargs.pop("hidden_states"))
        layer_kwargs.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _StopForward

    handle = adapter.layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    device = adapter.embedding.weight.device
    try:
        for batch in batches:
            try:
                adapter.model(input_ids=batch.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return LayerInputs(hidden, layer_kwargs)


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: LayerInputs) -> LayerInputs:
    """Outputs of one decoder layer for every batch (the inputs of the next layer)."""
    outputs = []
    for hidden, kwargs in zip(inputs.hidden, inputs.layer_kwargs, strict=True):
        out = layer(hidden, **kwargs)
        outputs.append(out[0] if isinstance(out, tuple) else out)
    return LayerInputs(outputs, inputs.layer_kwargs)
