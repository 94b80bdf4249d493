"""Perplexity of Hugging Face models and of ROSAQ checkpoints (through the torch reference linear)."""

import math
from pathlib import Path

import torch
from rosaq_kernels.packing import unpack_zeros
from rosaq_kernels.reference import dequantize, rosaq_linear_reference
from torch import nn
from tqdm.auto import tqdm

from rosaq_vllm.checkpoint import QUANTIZED_LINEARS, RosaqQuantConfig, load_config, load_tensors, projection_prefix

_LINEAR_SUFFIXES = ("qweight", "scales", "qzeros", "salient_idx", "salient_weight", "rot")


class RosaqReferenceLinear(nn.Module):
    """A ROSAQ linear computed by the torch reference (what the vLLM plugin computes on CPU)."""

    def __init__(self, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None, bits: int, group_size: int):
        super().__init__()
        for name in _LINEAR_SUFFIXES:
            self.register_buffer(name, tensors.get(name), persistent=False)
        self.qzeros = unpack_zeros(self.qzeros, bits)  # the reference takes them unpacked, [N, K // g]
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.bits = bits
        self.group_size = group_size
        self.out_features, self.in_features = tensors["qweight"].shape[0], tensors["scales"].shape[1] * group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        y = rosaq_linear_reference(flat, self.qweight, self.scales, self.qzeros, self.salient_idx,
                                   self.salient_weight, self.rot, self.bits, self.group_size)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], -1)


def effective_weight(parts: dict[str, torch.Tensor], bits: int, group_size: int) -> torch.Tensor:
    """The dense float32 ``[N, K]`` weight that a ROSAQ linear applies to its (unrotated) input.

    ``y = (x·R)·(deq + salient)ᵀ = x·((deq + salient)·Rᵀ)ᵀ`` with ``R = blockdiag(rot)``.
    """
    zeros = unpack_zeros(parts["qzeros"], bits)
    weight = dequantize(parts["qweight"], parts["scales"], zeros, bits, group_size).to(torch.float64)
    idx = parts["salient_idx"].long()
    weight[:, idx] += parts["salient_weight"].to(torch.float64)
    rot = parts.get("rot")
    if rot is not None:
        weight = weight @ torch.block_diag(*rot.to(torch.float64)).t()
    return weight.to(torch.float32)


def model_from_tensors(hf_config: dict, cfg: RosaqQuantConfig, tensors: dict[str, torch.Tensor],
                       dtype: torch.dtype = torch.float32, dense: bool = False) -> nn.Module:
    """A transformers model computing the ROSAQ checkpoint ``tensors``.

    ``dense=False``: projections are :class:`RosaqReferenceLinear` (what the vLLM plugin computes on CPU).
    ``dense=True``: projections are plain ``nn.Linear`` holding :func:`effective_weight` (the same function up
    to float32 rounding, as fast as the original model; used for accuracy sweeps).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config_dict = {k: v for k, v in hf_config.items() if k != "quantization_config"}
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    dense_tensors = {k: v.to(dtype) for k, v in tensors.items() if not k.endswith(_LINEAR_SUFFIXES)}
    missing, unexpected = model.load_state_dict(dense_tensors, strict=False)
    still_missing = [k for k in missing if not (k.endswith(".weight") and k.rsplit(".", 2)[-2] in QUANTIZED_LINEARS)]
    if still_missing or unexpected:
        raise ValueError(f"checkpoint does not fit the model: missing {still_missing}, unexpected {unexpected}")
    for layer_index, layer in enumerate(model.model.layers):
        for projection in QUANTIZED_LINEARS:
            prefix = projection_prefix(layer_index, projection)
            parts = {s: tensors[f"{prefix}.{s}"] for s in _LINEAR_SUFFIXES if f"{prefix}.{s}" in tensors}
            parent = layer.mlp if projection in ("gate_proj", "up_proj", "down_proj") else layer.self_attn
            if dense:
                getattr(parent, projection).weight.data = effective_weight(parts, cfg.bits, cfg.group_size).to(dtype)
            else:
                bias = getattr(parent, projection).bias
                setattr(parent, projection, RosaqReferenceLinear(parts, bias, cfg.bits, cfg.group_size))
    return model


def load_reference_model(checkpoint: str | Path, dtype: torch.dtype = torch.float32, dense: bool = False) -> nn.Module:
    """A transformers model whose projections are :class:`RosaqReferenceLinear` modules of the checkpoint
    (``dense=True``: plain linears holding the same effective weights, see :func:`model_from_tensors`)."""
    checkpoint = Path(checkpoint)
    hf_config, cfg = load_config(checkpoint)
    return model_from_tensors(hf_config, cfg, load_tensors(checkpoint), dtype, dense)


@torch.no_grad()
def token_nll(model: nn.Module, token_ids: torch.Tensor, context: int, batch_size: int = 4) -> torch.Tensor:
    """Negative log-likelihood (float64 ``[windows, context - 1]``) of every predicted token over
    non-overlapping windows of ``context`` tokens of ``token_ids [T]`` (tail dropped); column ``j`` is the
    prediction of window position ``j + 1`` from positions ``0..j``."""
    windows = token_ids[: token_ids.numel() // context * context].view(-1, context)
    if windows.numel() == 0:
        raise ValueError(f"need at least {context} tokens, got {token_ids.numel()}")
    device = next(model.parameters()).device
    rows = []
    for batch in tqdm(windows.split(batch_size), desc="perplexity", unit="batch"):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                           batch[:, 1:].reshape(-1), reduction="none")
        rows.append(loss.view(batch.shape[0], -1).to(torch.float64).cpu())
    return torch.cat(rows)


def perplexity(model: nn.Module, token_ids: torch.Tensor, context: int, batch_size: int = 4) -> float:
    """Perplexity over non-overlapping windows of ``context`` tokens of ``token_ids [T]`` (tail dropped)."""
    return math.exp(token_nll(model, token_ids, context, batch_size).mean().item())
