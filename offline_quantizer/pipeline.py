"""The ROSAQ pipeline: fold norms (absorbed), calibrate, rotate, choose salient channels, quantize, write.

Per decoder layer there are four rotation sites (the inputs of q/k/v, o_proj, gate/up, down_proj).
``absorbed`` (default) rotates the residual stream by one shared PCA basis absorbed into the embedding,
every layer and ``lm_head``, absorbs a per-KV-head basis into v_proj / o_proj, and gives down_proj an
online block-diagonal PCA rotation. ``per-layer`` gives every site its own block-diagonal PCA basis
(blocks of ``block_size`` channels; 0: one block over the whole input), applied online after the RMSNorm, so
no norm is folded. ``none`` keeps the original basis (saliency in the original feature space).
"""

import copy
import dataclasses
import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from offline_quantizer.adapters import ATTN_IN, MLP_IN, DecoderAdapter
from offline_quantizer.calibration import LayerInputs, capture_first_layer_inputs, run_layer, token_batches
from offline_quantizer.evaluate import effective_weight
from offline_quantizer.fold import fold_final_norm, fold_layer_norms, fold_norms, untie_lm_head
from offline_quantizer.gptq import gptq_quantize_linear
from offline_quantizer.quantize import quantize_linear
from offline_quantizer.rotation import (
    BlockSecondMoment,
    block_diag,
    mix_complement,
    pca_basis,
    rotate_embedding,
    rotate_input,
    rotate_output,
    rotate_value_output,
    rotated_energy,
)
from offline_quantizer.saliency import salient_priority, select_salient
from offline_quantizer.workdir import WorkDir
from rosaq_vllm.checkpoint import (
    QUANTIZED_LINEARS,
    RosaqQuantConfig,
    atomic_output_dir,
    projection_prefix,
    write_config,
    write_tensors,
)

logger = logging.getLogger(__name__)

#: rotation site -> (projection whose input is recorded, projections that read that input)
SITES = {
    "attn_in": ("q_proj", ATTN_IN),
    "attn_out": ("o_proj", ("o_proj",)),
    "mlp_in": ("gate_proj", MLP_IN),
    "mlp_out": ("down_proj", ("down_proj",)),
}
ONLINE_ROTATION = {"absorbed": ("down_proj",), "per-layer": QUANTIZED_LINEARS, "none": ()}
#: basis of the quantized (non-salient) channels -> the rotation sites whose PCA basis is mixed by a random orthogonal
#: matrix there (incoherent channels, see mix_complement); the other sites keep the PCA basis itself. "random-except-vo"
#: leaves the per-head V/O bases (site "attn_out") unmixed: mixing them cost the most perplexity (docs/accuracy.md).
MIXED_SITES = {"pca": (), "random": ("residual", "attn_out", "mlp_out"), "random-except-vo": ("residual", "mlp_out")}
COMPLEMENTS = tuple(MIXED_SITES)
#: the sink weight of ``QuantizeOptions(sink_weight=None)`` where a rotation is rounded by GPTQ, except at 3 bits
#: with no salient channel (there 1: 64 cost SmolLM2 W3 K = 0 7–15 %). Measured: SmolLM2 W3 K = 3 % −3.8 % perplexity
#: over three seeds, W4 K = 0 −0.3 % / −1.2 % (two seeds), Qwen W4 K = 0 −2.0 %, K = 0.5 % −2.6 %, the other cells
#: level (docs/accuracy.md)
SINK_WEIGHT = 64.0
#: Default ``QuantizeOptions.outlier_ratio``: a channel whose peak magnitude exceeds this many times the median
#: channel's is a massive-activation channel (keeps its axis, salient first).
OUTLIER_RATIO = 20.0


@dataclass(frozen=True)
class QuantizeOptions:
    """What to build. ``salient``: a fraction of each linear's inputs if < 1, else a channel count."""

    bits: int = 4
    group_size: int = 128
    salient: float = 0.03
    rotation: str = "absorbed"
    block_size: int = 128
    damping: float = 0.01
    outlier_ratio: float = OUTLIER_RATIO  # absorbed: residual channels this far above the median peak are not rotated
    gptq: bool = False  # error-compensating (GPTQ) rounding in each linear's final basis; needs full moments
    act_order: bool = False  # GPTQ: round columns by decreasing second moment (group parameters fixed first)
    sequential: bool = False  # calibrate each layer on the outputs of the layers before it *quantized*
    complement: str = "pca"  # basis of the quantized channels, one of COMPLEMENTS (mixed at MIXED_SITES[complement])
    clip: bool = False  # search each group's range (quantize.group_params) instead of its min/max
    seed: int = 0  # of the random orthogonal matrices of a mixed complement (rotation.mix_complement)
    # weight of each calibration window's first token (attention sink) in each layer's moments (GPTQ's Hessians, the
    # down_proj and V/O bases); the residual-stream basis always counts it once. None: see layer_sink_weight
    sink_weight: float | None = 1.0
    # absorbed: rotate down_proj's input online (its PCA basis; the one rotation no weight can absorb). False keeps
    # down_proj in its original basis, salient channels by energy: no rotation tensor, one launch less a layer
    online_rotation: bool = True

    @property
    def folds_norms(self) -> bool:
        """Whether RMSNorm scales are folded into the linears: only the shared residual basis needs it (a
        weightless norm commutes with rotations of the residual stream). Folding costs accuracy elsewhere: the
        scales make the columns of one quantization group unequal (SmolLM2 W3 g64 RTN: perplexity 87 unfolded,
        321 folded, docs/accuracy.md)."""
        return self.rotation == "absorbed"

    def layer_sink_weight(self, in_features: Iterable[int]) -> float:
        """The sink weight of a layer whose linears have ``in_features`` inputs: ``sink_weight``, or where it is
        ``None`` :data:`SINK_WEIGHT` if a rotation is rounded by GPTQ and either the weights have 4 bits or one of
        the linears keeps salient channels (a fraction of salient channels can round to none: SmolLM2 at 0.5 %),
        else 1."""
        if self.sink_weight is not None:
            return self.sink_weight
        keeps_salient = any(self.quant_config().num_salient_for(width) > 0 for width in in_features)
        weighted = self.rotation != "none" and self.gptq and (self.bits >= 4 or keeps_salient)
        return SINK_WEIGHT if weighted else 1.0

    @property
    def online_projections(self) -> tuple[str, ...]:
        """The projections whose input is rotated online (the checkpoint's ``online_rotation``)."""
        return ONLINE_ROTATION.get(self.rotation, ()) if self.online_rotation else ()

    def rotates_online(self, site: str) -> bool:
        """Whether the input of ``site`` (a key of :data:`SITES`) is rotated online."""
        return SITES[site][0] in self.online_projections

    def quant_config(self) -> RosaqQuantConfig:
        """The checkpoint's ``quantization_config`` (validates the options)."""
        if self.complement not in COMPLEMENTS:
            raise ValueError(f"complement must be one of {COMPLEMENTS}, got {self.complement!r}")
        if not self.online_rotation and self.rotation != "absorbed":
            raise ValueError(f"online_rotation=False applies to rotation 'absorbed' only, got {self.rotation!r}")
        if self.complement != "pca" and self.rotation == "none":
            raise ValueError(f"complement={self.complement!r} mixes a rotation's quantized channels; rotation 'none' "
                             "has none")
        is_fraction = self.salient < 1
        return RosaqQuantConfig(
            bits=self.bits,
            group_size=self.group_size,
            num_salient=None if is_fraction else int(self.salient),
            salient_fraction=float(self.salient) if is_fraction else None,
            rotation=self.rotation,
            rotation_block_size=self.block_size,
            online_rotation=self.online_projections,
        )


@dataclass
class RotatedLinear:
    """A projection in its final input basis, before quantization.

    Attributes:
        weight: float64 ``[N, K]`` (input already in the rotated basis).
        rot: float64 ``[nb, B, B]`` online rotation of the input, or ``None``.
        energy: float64 ``[K]`` activation energy per input channel in that basis.
        hessian: float64 ``[K, K]`` full second moment of the input in that basis (only with ``gptq``).
    """

    weight: torch.Tensor
    rot: torch.Tensor | None
    energy: torch.Tensor
    hessian: torch.Tensor | None = None


class StreamingAdapter(DecoderAdapter):
    """A model whose decoder layers stay on the CPU in the model's own dtype and are computed on ``device``.

    Every visit of a layer (:meth:`iter_layers`) works on a fresh float32 copy on ``device``, with its norms
    folded (``fold``) and, once :attr:`basis` is set, the residual basis applied. The copy replaces the layer in
    the model while it is visited and is freed afterwards, so the device holds one layer (plus the calibration
    activations) at a time. Folding and rotating a float32 copy gives exactly the layer that the in-place path
    computes for a model loaded in float32. The embedding, final norm and lm_head are converted to float32 on the CPU.
    """

    def __init__(self, model: nn.Module, device: torch.device | str, fold: bool = True) -> None:
        super().__init__(model)
        self.device = torch.device(device)
        self.fold = fold
        self.basis: torch.Tensor | None = None

    def iter_layers(self) -> Iterator[nn.Module]:
        for index in range(len(self.layers)):
            original = self.layers[index]
            layer = copy.deepcopy(original).to(self.device, torch.float32)
            if self.fold:
                fold_layer_norms(self, layer)
            if self.basis is not None:
                rotate_layer_residual(self, layer, self.basis)
            self.layers[index] = layer
            try:
                yield layer
            finally:
                self.layers[index] = original
                layer.to("meta")  # free the device copy now, not when the caller drops it


def _stat_block(opts: QuantizeOptions, site: str, dim: int, head_dim: int) -> int:
    """Block size of the second moment recorded at a site (1: diagonal only, dim: full)."""
    if opts.rotates_online(site):
        return opts.block_size or dim
    if opts.rotation == "absorbed" and site == "attn_out":
        return head_dim
    return 1


def _diagonal_blocks(moment: torch.Tensor, block: int) -> torch.Tensor:
    """The ``[d/B, B, B]`` diagonal blocks of a recorded moment ``[nb, b, b]`` (unchanged if ``b == B``)."""
    if moment.shape[-1] == block:
        return moment
    full = moment[0]
    nb = full.shape[0] // block
    return torch.stack([full[i * block:(i + 1) * block, i * block:(i + 1) * block] for i in range(nb)])


@torch.no_grad()
def _record_moments(
    adapter: DecoderAdapter, layer: nn.Module, inputs: LayerInputs, blocks: dict[str, int], sink_weight: float = 1.0
) -> tuple[dict[str, BlockSecondMoment], LayerInputs]:
    """Run one layer over the calibration batches, recording the second moments of its site inputs (each window's
    first token weighted by ``sink_weight``)."""
    moments: dict[str, BlockSecondMoment] = {}
    handles = []
    for site, block in blocks.items():
        linear = adapter.projection(layer, SITES[site][0])
        moment = BlockSecondMoment(linear.in_features, block, device=linear.weight.device,
                                   first_token_weight=sink_weight)
        moments[site] = moment
        handles.append(linear.register_forward_pre_hook(lambda _m, args, mom=moment: mom.add(args[0])))
    try:
        outputs = run_layer(layer, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return moments, outputs


def outlier_channels(peak: torch.Tensor, ratio: float) -> torch.Tensor:
    """Channels whose peak magnitude exceeds ``ratio`` times the median channel's (massive
    activations, e.g. of attention-sink tokens); ascending int64 indices. ``ratio <= 0`` finds none."""
    if ratio <= 0:
        return torch.empty(0, dtype=torch.int64)
    return torch.nonzero(peak > ratio * peak.median()).flatten()


@torch.no_grad()
def residual_basis(adapter: DecoderAdapter, inputs: LayerInputs, opts: QuantizeOptions) -> torch.Tensor:
    """Orthogonal basis ``[d, d]`` of the residual stream (the model's norms must be folded).

    Channels with massive activations (:func:`outlier_channels` of the residual stream's peak magnitudes)
    keep their own axis: rotating them would spread one huge coordinate, and the weights that write it,
    over every channel. The other channels get the PCA basis of the normalized inputs of every attention
    and MLP block, summed over layers; with a mixed ``opts.complement`` all but the principal directions
    (as many as a linear of width ``d`` keeps salient) are then mixed (:func:`incoherent_complement`). Every token
    counts once here, ``opts.sink_weight`` applies to each layer's own moments only (weighting the sink in this
    basis too cost SmolLM2 W4 1.5 % perplexity, ``docs/accuracy.md``).
    """
    total = None
    peak = torch.zeros(adapter.embedding.embedding_dim, dtype=torch.float64)
    for layer in tqdm(adapter.iter_layers(), desc="residual PCA", unit="layer", total=len(adapter.layers)):
        for hidden in inputs.hidden:
            peak = torch.maximum(peak, hidden.abs().reshape(-1, peak.numel()).amax(0).cpu().to(torch.float64))
        moments, inputs = _record_moments(adapter, layer, inputs, {"attn_in": layer.self_attn.q_proj.in_features,
                                                                   "mlp_in": layer.mlp.gate_proj.in_features})
        layer_sum = moments["attn_in"].mean() + moments["mlp_in"].mean()
        total = layer_sum if total is None else total + layer_sum
    outliers = outlier_channels(peak, opts.outlier_ratio).to(total.device)
    keep = torch.ones(peak.numel(), dtype=torch.bool, device=total.device)
    keep[outliers] = False
    rest = torch.nonzero(keep).flatten()
    logger.info("residual stream: %d massive-activation channels keep their axis: %s", outliers.numel(),
                outliers.tolist())
    basis = torch.zeros_like(total[0])
    basis[outliers, outliers] = 1.0
    basis[rest.unsqueeze(1), rest.unsqueeze(0)] = pca_basis(total[:, rest][:, :, rest], opts.damping)[0]
    return incoherent_complement(basis[None], total, ~keep, opts, "residual")[0]


def incoherent_complement(
    basis: torch.Tensor, moment: torch.Tensor, outliers: torch.Tensor, opts: QuantizeOptions, site: str,
    group: int = 1,
) -> torch.Tensor:
    """``basis`` with its quantized channels mixed where ``opts.complement`` mixes ``site`` (:data:`MIXED_SITES`:
    "residual", "attn_out" or "mlp_out"), else ``basis`` itself.

    The principal channels are those the salient selection will keep: the ``num_salient_for(d)`` of largest
    energy in ``basis`` and every outlier channel; the rest of each block is mixed by :func:`mix_complement`.

    Args:
        basis: float64 ``[nb, B, B]`` block bases.
        moment: float64 ``[nb · group, B, B]`` block second moments (``group`` moments share one basis: the
            query heads of one KV head).
        outliers: bool ``[nb · group · B]`` channels that are salient first (``salient_priority``).
    """
    if site not in MIXED_SITES[opts.complement]:
        return basis
    energy = rotated_energy(moment, basis.repeat_interleave(group, dim=0))
    energy = salient_priority(energy, outliers)
    principal = outliers.clone()
    principal[torch.topk(energy, opts.quant_config().num_salient_for(energy.numel())).indices] = True
    return mix_complement(basis, principal.view(basis.shape[0], group, -1).any(1), opts.seed)


@torch.no_grad()
def rotate_layer_residual(adapter: DecoderAdapter, layer: nn.Module, basis: torch.Tensor) -> None:
    """Make one decoder layer read and write the residual stream as ``h·Q``."""
    for name in ATTN_IN + MLP_IN:
        rotate_input(adapter.projection(layer, name), basis)
    rotate_output(adapter.projection(layer, "o_proj"), basis)
    rotate_output(adapter.projection(layer, "down_proj"), basis)


@torch.no_grad()
def apply_residual_basis(adapter: DecoderAdapter, basis: torch.Tensor) -> None:
    """Carry the residual stream as ``h·Q``: embedding, every block's inputs and outputs, and lm_head.

    A :class:`StreamingAdapter` rotates its layers on each visit instead.
    """
    rotate_embedding(adapter.embedding, basis)
    if isinstance(adapter, StreamingAdapter):
        adapter.basis = basis
    else:
        for layer in adapter.layers:
            rotate_layer_residual(adapter, layer, basis)
    rotate_input(adapter.lm_head, basis)


def _weight(adapter: DecoderAdapter, layer: nn.Module, name: str) -> torch.Tensor:
    return adapter.projection(layer, name).weight.detach().to(torch.float64)


@torch.no_grad()
def rotate_layer(
    adapter: DecoderAdapter, layer: nn.Module, moments: dict[str, BlockSecondMoment], opts: QuantizeOptions
) -> dict[str, RotatedLinear]:
    """Apply the layer-local rotations of ``opts.rotation`` and return every projection in its final basis.

    Rotations absorbed into weights are written into ``layer``; online ones are returned as ``rot``.
    """
    result: dict[str, RotatedLinear] = {}
    for site, (_, projections) in SITES.items():
        recorded_moment = moments[site].mean()
        dim = recorded_moment.shape[0] * recorded_moment.shape[-1]
        block = _stat_block(opts, site, dim, adapter.shape.head_dim)
        moment = _diagonal_blocks(recorded_moment, block)
        # Massive-activation channels keep their axis in every basis built here and are salient first.
        outliers = torch.zeros(dim, dtype=torch.bool, device=moment.device)
        outliers[outlier_channels(moments[site].peak, opts.outlier_ratio).to(moment.device)] = True
        keep_axis = outliers.view(-1, block)
        rot = None
        final_basis = None  # dense rotation of this site's input (None: identity), for the GPTQ Hessian
        if opts.rotates_online(site):  # per-layer: every site; absorbed: down_proj's input
            basis = incoherent_complement(pca_basis(moment, opts.damping, keep_axis), moment, outliers, opts, site)
            final_basis = block_diag(basis)
            for name in projections:
                rotate_input(adapter.projection(layer, name), final_basis)
            rot, energy = basis, rotated_energy(moment, basis)
        elif opts.rotation == "absorbed" and site == "attn_out":
            shape = adapter.shape
            group = shape.num_heads // shape.num_kv_heads
            per_kv = moment.view(shape.num_kv_heads, group, shape.head_dim, shape.head_dim).sum(1)
            per_kv_keep = keep_axis.view(shape.num_kv_heads, group, shape.head_dim).any(1)
            outliers = per_kv_keep.repeat_interleave(group, dim=0).reshape(-1)
            head_bases = incoherent_complement(pca_basis(per_kv, opts.damping, per_kv_keep), moment, outliers, opts,
                                               site, group)
            rotate_value_output(adapter.projection(layer, "v_proj"), adapter.projection(layer, "o_proj"),
                                head_bases, shape.num_heads)
            energy = rotated_energy(moment, head_bases.repeat_interleave(group, dim=0))
            final_basis = block_diag(head_bases.repeat_interleave(group, dim=0))
        else:
            energy = torch.diagonal(moment, dim1=-2, dim2=-1).reshape(-1)
        energy = salient_priority(energy, outliers)
        hessian = None
        if opts.gptq:
            if recorded_moment.shape[0] != 1:
                raise ValueError("gptq needs the full second moment of every site (record with gptq=True)")
            full = recorded_moment[0]
            hessian = full if final_basis is None else final_basis.t() @ full @ final_basis
        for name in projections:
            result[name] = RotatedLinear(None, rot, energy, hessian)
    # read the weights only after every site is rotated: a later site can rotate an earlier site's projection
    # (attn_out rotates v_proj's output), and ``_weight`` copies unless the model is float64
    for name, rotated in result.items():
        rotated.weight = _weight(adapter, layer, name)
    return result


#: ``on_layer(index, projections)``: receives a layer's projections in their final basis (the layer being visited
#: is ``adapter.layers[index]``); with ``opts.sequential`` it must make that layer compute its quantized function
#: (:func:`load_quantized_layer`).
LayerCallback = Callable[[int, dict[str, RotatedLinear]], None]
#: ``restore(index, layer)``: the same for a layer finished by an interrupted run (resume).
RestoreCallback = Callable[[int, nn.Module], None]


@torch.no_grad()
def prepare_model(
    model: nn.Module, batches: list[torch.Tensor], opts: QuantizeOptions, basis: torch.Tensor | None = None,
    stream_device: torch.device | str | None = None,
) -> tuple[DecoderAdapter, LayerInputs, torch.Tensor | None]:
    """Fold the norms (absorbed mode), record the first layer's inputs and (absorbed) rotate the residual stream.

    ``basis``: a residual basis computed earlier (resume); computed here when ``None``.
    ``stream_device``: ``None`` works on ``model`` in place (it must be float32 or float64, on one device);
    otherwise ``model`` stays on the CPU in its dtype and its layers are streamed through that device
    (:class:`StreamingAdapter`), with the calibration activations kept there.
    Returns the adapter, the (rotated) first-layer inputs and the residual basis (``None`` unless absorbed).
    """
    opts.quant_config()  # validate before any work
    if stream_device is None:
        adapter = DecoderAdapter(model)
        if opts.folds_norms:
            fold_norms(adapter)
        else:
            untie_lm_head(adapter)
        inputs = capture_first_layer_inputs(adapter, batches)
    else:
        adapter = StreamingAdapter(model, stream_device, fold=opts.folds_norms)
        untie_lm_head(adapter)
        for module in (adapter.embedding, adapter.final_norm, adapter.lm_head):
            module.to(torch.float32)
        if opts.folds_norms:
            fold_final_norm(adapter)
        for module in model.model.children():  # the rotary embedding (float32 buffers)
            if module not in (adapter.layers, adapter.embedding, adapter.final_norm):
                module.to(adapter.device)
        adapter.embedding.to(adapter.device)  # for the first layer's inputs only
        inputs = capture_first_layer_inputs(adapter, batches)
        adapter.embedding.to("cpu")
    if opts.rotation != "absorbed":
        return adapter, inputs, None
    if basis is None:
        basis = residual_basis(adapter, inputs, opts)
    apply_residual_basis(adapter, basis)
    inputs.hidden = [(h.to(torch.float64) @ basis.to(h.device)).to(h.dtype) for h in inputs.hidden]
    return adapter, inputs, basis


@torch.no_grad()
def rotate_layers(
    adapter: DecoderAdapter, inputs: LayerInputs, opts: QuantizeOptions, on_layer: LayerCallback,
    start_layer: int = 0, restore: RestoreCallback | None = None,
) -> None:
    """Calibrate and rotate the decoder layers from ``start_layer`` on, one at a time.

    ``on_layer(index, projections)`` receives each layer's projections in their final basis right after
    that layer is done (only one layer's calibration activations are alive at any time). Layers before
    ``start_layer`` are only run forward, to produce the inputs of the next ones (``opts.sequential``: after
    ``restore`` made them compute their quantized function).

    ``opts.sequential``: the next layer's inputs are this layer's outputs once quantized (``on_layer`` loads the
    quantized layer), as in GPTQ's and llm-compressor's sequential calibration: each layer is fit to the inputs
    it will see, the errors of the layers before it included. Otherwise they are the full-precision outputs.
    """
    # the decoder layers share their linears' widths, so one layer resolves the sink weight of all
    first = adapter.layers[0]
    sink_weight = opts.layer_sink_weight(adapter.projection(first, name).in_features for name in QUANTIZED_LINEARS)
    logger.info("attention sink weighted %g in each layer's moments", sink_weight)
    layers = tqdm(adapter.iter_layers(), desc=f"ROSAQ {opts.rotation}", unit="layer", total=len(adapter.layers))
    for index, layer in enumerate(layers):
        if index < start_layer:
            if opts.sequential:
                if restore is None:
                    raise ValueError("resuming a sequential run needs the finished layers' tensors (restore)")
                restore(index, layer)
            inputs = run_layer(layer, inputs)
            continue
        blocks = {}
        for site in SITES:
            dim = adapter.projection(layer, SITES[site][0]).in_features
            blocks[site] = dim if opts.gptq else _stat_block(opts, site, dim, adapter.shape.head_dim)
        moments, outputs = _record_moments(adapter, layer, inputs, blocks, sink_weight)
        on_layer(index, rotate_layer(adapter, layer, moments, opts))
        if opts.sequential:  # on_layer made the layer compute its quantized function
            outputs = run_layer(layer, inputs)
        inputs = outputs


def rotate_model(model: nn.Module, batches: list[torch.Tensor], opts: QuantizeOptions, on_layer: LayerCallback) -> None:
    """Fold, calibrate and rotate ``model`` in place (see :func:`prepare_model` and :func:`rotate_layers`)."""
    adapter, inputs, _ = prepare_model(model, batches, opts)
    rotate_layers(adapter, inputs, opts, on_layer)


def _is_dense(name: str) -> bool:
    """Tensors stored as-is: everything but projection weights (quantized) and rotary buffers."""
    is_projection_weight = name.endswith(".weight") and name.rsplit(".", 2)[-2] in QUANTIZED_LINEARS
    return not is_projection_weight and "rotary_emb" not in name


def quantize_rotated_linear(rotated: RotatedLinear, opts: QuantizeOptions) -> dict[str, torch.Tensor]:
    """The checkpoint tensors (CPU) of one projection in its final basis: salient channels, codes, online rotation."""
    cfg = opts.quant_config()
    salient_idx = select_salient(rotated.energy, cfg.num_salient_for(rotated.weight.shape[1]))
    if opts.gptq:
        if rotated.hessian is None:
            raise ValueError("gptq needs the full second moment of every site (record with gptq=True)")
        parts = gptq_quantize_linear(rotated.weight, rotated.hessian.to(rotated.weight.device), salient_idx, cfg.bits,
                                     cfg.group_size, opts.damping, act_order=opts.act_order, clip=opts.clip)
    else:
        parts = quantize_linear(rotated.weight, salient_idx, cfg.bits, cfg.group_size, opts.clip)
    parts = {suffix: tensor.cpu() for suffix, tensor in parts.items()}
    if rotated.rot is not None:
        parts["rot"] = rotated.rot.to(torch.float32).cpu()
    return parts


@torch.no_grad()
def load_quantized_layer(adapter: DecoderAdapter, layer: nn.Module, index: int, layer_tensors: dict[str, torch.Tensor],
                         cfg: RosaqQuantConfig) -> None:
    """Make decoder layer ``index`` compute what its checkpoint tensors compute (sequential calibration).

    Projection weights become their dense effective weights (:func:`evaluate.effective_weight`, the online
    rotation included); the other tensors of the layer (biases, folded norms) take their stored values.
    """
    prefix = f"model.layers.{index}."
    state = layer.state_dict()
    stored = {k[len(prefix):]: v for k, v in layer_tensors.items() if k[len(prefix):] in state}
    layer.load_state_dict(stored, strict=False)
    for name in QUANTIZED_LINEARS:
        linear_prefix = projection_prefix(index, name) + "."
        parts = {k[len(linear_prefix):]: v for k, v in layer_tensors.items() if k.startswith(linear_prefix)}
        weight = adapter.projection(layer, name).weight
        weight.copy_(effective_weight(parts, cfg.bits, cfg.group_size).to(weight.device, weight.dtype))


def quantize_model(model: nn.Module, batches: list[torch.Tensor], opts: QuantizeOptions, dtype: torch.dtype,
                   work: WorkDir | None = None, stream_device: torch.device | str | None = None
                   ) -> dict[str, torch.Tensor]:
    """All checkpoint tensors of ``model`` quantized with ROSAQ; unquantized tensors in ``dtype``.

    With ``work``, every finished layer (and the residual basis) is saved there, and layers already
    there are reused instead of recomputed (resume gives a byte-identical result).
    ``stream_device``: see :func:`prepare_model`.
    """
    cfg = opts.quant_config()
    tensors: dict[str, torch.Tensor] = {}
    start_layer = work.finished_layers() if work else 0
    adapter, inputs, basis = prepare_model(model, batches, opts, work.load_basis() if work else None, stream_device)
    if work and basis is not None:
        work.save_basis(basis.cpu())

    def store(index: int, projections: dict[str, RotatedLinear]) -> None:
        layer_tensors = {}
        for name, rotated in projections.items():
            prefix = projection_prefix(index, name)
            for suffix, tensor in quantize_rotated_linear(rotated, opts).items():
                layer_tensors[f"{prefix}.{suffix}"] = tensor
        for name, tensor in adapter.layers[index].state_dict().items():
            if _is_dense(name):
                layer_tensors[f"model.layers.{index}.{name}"] = tensor.detach().to(dtype).cpu()
        if work:
            work.save_layer(index, layer_tensors)
        tensors.update(layer_tensors)
        if opts.sequential:
            load_quantized_layer(adapter, adapter.layers[index], index, layer_tensors, cfg)

    def restore(index: int, layer: nn.Module) -> None:
        load_quantized_layer(adapter, layer, index, work.load_layer(index), cfg)

    if start_layer:
        logger.info("resuming: layers 0..%d are done", start_layer - 1)
    for index in range(start_layer):
        tensors.update(work.load_layer(index))
    rotate_layers(adapter, inputs, opts, store, start_layer, restore)
    for name, tensor in model.state_dict().items():
        if not name.startswith("model.layers.") and _is_dense(name):
            tensors[name] = tensor.detach().to(dtype).cpu().contiguous()
    return dict(sorted(tensors.items()))


def _hf_dtype(config: object) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def quantize_checkpoint(
    model_path: str | Path,
    out_dir: str | Path,
    calibration_text: str,
    opts: QuantizeOptions,
    num_samples: int = 128,
    seq_len: int = 2048,
    batch_size: int = 8,
    device: str = "cpu",
    overwrite: bool = False,
    resume: bool = False,
) -> Path:
    """Quantize a Hugging Face causal LM directory into a ROSAQ checkpoint directory (atomically).

    The model is loaded on the CPU in its own dtype; its decoder layers are calibrated, rotated and quantized in
    float32 on ``device`` one at a time (peak device memory: one layer plus the calibration activations).
    Unquantized tensors keep the model's dtype.
    ``seq_len`` is capped by the model's context length. Finished layers are kept in a work directory
    beside the output until the checkpoint is published; ``resume`` continues an interrupted run from them.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    cfg = opts.quant_config()
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass --overwrite to replace it")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype="auto").eval()
    dtype = _hf_dtype(model.config)
    seq_len = min(seq_len, getattr(model.config, "max_position_embeddings", seq_len))
    batches = token_batches(tokenizer, calibration_text, num_samples, seq_len, batch_size)
    logger.info("calibrating on %d x %d tokens", num_samples, seq_len)
    fingerprint = {
        "model": str(Path(model_path).resolve()), "options": dataclasses.asdict(opts), "device": device,
        "num_samples": num_samples, "seq_len": seq_len, "batch_size": batch_size,
        "calibration_sha256": hashlib.sha256(calibration_text.encode()).hexdigest(),
    }
    work = WorkDir(out_dir.parent / f".{out_dir.name}.work", fingerprint, resume)
    tensors = quantize_model(model, batches, opts, dtype, work, stream_device=device)
    hf_config = model.config.to_dict()
    hf_config.pop("quantization_config", None)
    hf_config["tie_word_embeddings"] = False

    def write(tmp: Path) -> None:
        write_tensors(tmp, tensors)
        write_config(tmp, hf_config, cfg)
        tokenizer.save_pretrained(tmp)
        try:
            GenerationConfig.from_pretrained(model_path).save_pretrained(tmp)
        except OSError:
            logger.info("%s has no generation_config.json", model_path)

    atomic_output_dir(out_dir, write, overwrite=overwrite)
    work.remove()
    logger.info("wrote %s", out_dir)
    return out_dir
