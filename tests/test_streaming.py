"""quantize_checkpoint streams the decoder layers through the device one at a time (model kept on the CPU in
its own dtype); the checkpoint is byte-identical to the in-place path on a model loaded in float32."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from offline_quantizer.calibration import token_batches
from offline_quantizer.cli import quantize_main, quantize_options, quantize_parser
from offline_quantizer.pipeline import (
    SINK_WEIGHT,
    QuantizeOptions,
    _hf_dtype,
    quantize_checkpoint,
    quantize_model,
)
from rosaq_vllm.checkpoint import validate_checkpoint, write_tensors
from tests.tiny_models import calibration_corpus

CALIB = {"num_samples": 8, "seq_len": 64, "batch_size": 4}


@pytest.fixture(scope="module")
def fp16_llama(tiny_model_dir, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama (tied embeddings) saved in float16, like the models the GPU benchmark quantizes."""
    source = tiny_model_dir("llama")
    out = tmp_path_factory.mktemp("tiny-llama-fp16")
    AutoModelForCausalLM.from_pretrained(source, dtype=torch.float16).save_pretrained(out)
    for path in source.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(path, out / path.name)
    return out


def _in_place_reference(model_dir: Path, opts: QuantizeOptions, out: Path) -> Path:
    """The pre-streaming path: the whole model in float32, quantized in place, tensors written as-is.

    The unquantized tensors are written in the checkpoint's own dtype (the pre-streaming ``quantize_checkpoint``
    read it from the config after loading in float32, so it wrote float16 models' dense tensors in float32).
    """
    dtype = _hf_dtype(AutoConfig.from_pretrained(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    batches = token_batches(
        AutoTokenizer.from_pretrained(model_dir),
        calibration_corpus(),
        CALIB["num_samples"],
        CALIB["seq_len"],
        CALIB["batch_size"],
    )
    tensors = quantize_model(model, batches, opts, dtype)
    out.mkdir()
    write_tensors(out, tensors)
    return out


CASES = [
    pytest.param("llama", "absorbed", {}, id="llama-absorbed"),
    pytest.param("llama-fp16", "absorbed", {}, id="llama-fp16-absorbed"),
    pytest.param("llama-fp16", "per-layer", {}, id="llama-fp16-per-layer"),
    pytest.param("qwen2", "absorbed", {}, id="qwen2-absorbed"),
    pytest.param("qwen2", "none", {"bits": 3}, id="qwen2-none-w3"),
    pytest.param("mistral", "absorbed", {"gptq": True}, id="mistral-absorbed-gptq"),
]


@pytest.mark.parametrize("arch,rotation,extra", CASES)
def test_streamed_checkpoint_is_byte_identical_to_in_place(
    tiny_model_dir, fp16_llama, tmp_path: Path, arch: str, rotation: str, extra: dict
) -> None:
    model_dir = fp16_llama if arch == "llama-fp16" else tiny_model_dir(arch)
    opts = QuantizeOptions(group_size=32, salient=16, block_size=64, rotation=rotation, **extra)
    streamed = quantize_checkpoint(model_dir, tmp_path / "streamed", calibration_corpus(), opts, device="cpu", **CALIB)
    reference = _in_place_reference(model_dir, opts, tmp_path / "reference")
    validate_checkpoint(streamed, check_values=True)
    got, want = load_file(streamed / "model.safetensors"), load_file(reference / "model.safetensors")
    assert got.keys() == want.keys()
    expected_dtype = torch.float16 if arch == "llama-fp16" else torch.float32
    assert got["model.embed_tokens.weight"].dtype == expected_dtype
    assert got["lm_head.weight"].dtype == expected_dtype
    assert json.loads((streamed / "config.json").read_text())["dtype"] == str(expected_dtype).removeprefix("torch.")
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name
    assert (streamed / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()


def test_streaming_leaves_the_model_layers_untouched(fp16_llama) -> None:
    """The layers stay on the CPU in float16 with their original values; only copies are folded and rotated."""
    model = AutoModelForCausalLM.from_pretrained(fp16_llama, dtype="auto").eval()
    before = {k: v.clone() for k, v in model.model.layers.state_dict().items()}
    batches = token_batches(AutoTokenizer.from_pretrained(fp16_llama), calibration_corpus(), 4, 64, 4)
    tensors = quantize_model(
        model, batches, QuantizeOptions(group_size=32, salient=16, block_size=64), torch.float16, stream_device="cpu"
    )
    after = model.model.layers.state_dict()
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert after[name].dtype == torch.float16 and after[name].device.type == "cpu", name
        assert torch.equal(after[name], tensor), name
    # the written norms are folded (1) although the model's own norms were not touched
    assert not torch.all(before["0.input_layernorm.weight"] == 1)
    assert torch.all(tensors["model.layers.0.input_layernorm.weight"] == 1)


@pytest.mark.parametrize("rotation", ["none", "per-layer"])
def test_norms_are_folded_only_for_the_residual_basis(fp16_llama, rotation) -> None:
    """Without the shared residual basis nothing needs weightless norms: the norms and the projection weights
    stay as they are (folding would make the columns of a quantization group unequal)."""
    model = AutoModelForCausalLM.from_pretrained(fp16_llama, dtype="auto").eval()
    gamma = model.model.layers[0].input_layernorm.weight.detach().clone()
    batches = token_batches(AutoTokenizer.from_pretrained(fp16_llama), calibration_corpus(), 4, 64, 4)
    tensors = quantize_model(model, batches, QuantizeOptions(group_size=32, salient=0, rotation=rotation),
                             torch.float16, stream_device="cpu")
    assert not torch.all(gamma == 1)
    assert torch.equal(tensors["model.layers.0.input_layernorm.weight"], gamma)


def test_cli_reports_elapsed_time(tiny_model_dir, tmp_path: Path, capsys) -> None:
    calib = tmp_path / "calib.txt"
    calib.write_text(calibration_corpus())
    out = tmp_path / "ckpt"
    quantize_main(
        [
            str(tiny_model_dir("llama")),
            str(out),
            "--group-size",
            "32",
            "--salient",
            "16",
            "--block-size",
            "64",
            "--calib",
            str(calib),
            "--num-samples",
            "8",
            "--seq-len",
            "64",
        ]
    )
    validate_checkpoint(out)
    report = [line for line in capsys.readouterr().out.splitlines() if line.startswith("rosaq-quantize:")]
    assert len(report) == 1 and report[0].endswith(" s"), report


def test_sink_weight_default_follows_rotation_bits_salient_channels_and_gptq() -> None:
    """``rosaq-quantize`` leaves ``sink_weight`` unresolved; the quantizer resolves it from the layers' widths."""
    parser = quantize_parser()

    def layer_weight(widths: tuple[int, ...], *flags: str) -> float:
        return quantize_options(parser.parse_args(["model", "out", *flags])).layer_sink_weight(widths)

    smollm2, qwen = (576, 1536), (896, 4864)
    assert layer_weight(smollm2) == SINK_WEIGHT  # the default: absorbed, 3 % salient, GPTQ
    assert layer_weight(smollm2, "--rotation", "per-layer", "--salient", "16") == SINK_WEIGHT
    assert layer_weight(qwen, "--salient", "0.005") == SINK_WEIGHT  # 32 of down_proj's 4864 inputs
    assert layer_weight(smollm2, "--salient", "0") == SINK_WEIGHT  # 4 bits
    assert layer_weight(smollm2, "--bits", "3", "--salient", "0.005") == 1.0  # rounds to no salient channel
    assert layer_weight(smollm2, "--bits", "3", "--salient", "0") == 1.0
    assert layer_weight(qwen, "--bits", "3", "--salient", "0.005") == SINK_WEIGHT
    assert layer_weight(smollm2, "--rotation", "none") == 1.0
    assert layer_weight(smollm2, "--no-gptq") == 1.0
    assert layer_weight(smollm2, "--salient", "0", "--sink-weight", "8") == 8.0


def test_unresolved_sink_weight_reaches_the_moments(fp16_llama) -> None:
    """``sink_weight=None`` quantizes exactly as the weight it resolves to (64 with GPTQ at 4 bits or with salient
    channels, else 1), and that weight changes the result."""
    batches = token_batches(AutoTokenizer.from_pretrained(fp16_llama), calibration_corpus(), 4, 64, 4)

    def quantized(bits: int, salient: float, sink_weight: float | None) -> dict[str, torch.Tensor]:
        model = AutoModelForCausalLM.from_pretrained(fp16_llama, dtype=torch.float32).eval()
        opts = QuantizeOptions(bits=bits, group_size=32, salient=salient, block_size=64, gptq=True,
                               sink_weight=sink_weight)
        return quantize_model(model, batches, opts, torch.float16)

    cases = ((3, 16, SINK_WEIGHT, 1.0), (3, 0, 1.0, SINK_WEIGHT), (4, 0, SINK_WEIGHT, 1.0))
    for bits, salient, resolved, other in cases:
        default, explicit, changed = (quantized(bits, salient, w) for w in (None, resolved, other))
        assert default.keys() == explicit.keys()
        assert all(torch.equal(default[name], explicit[name]) for name in default)
        assert any(not torch.equal(default[name], changed[name]) for name in default if name.endswith("qweight"))


def test_cli_complement_default_follows_the_rotation(capsys) -> None:
    parser = quantize_parser()

    def complement(*flags: str) -> str:
        return quantize_options(parser.parse_args(["model", "out", *flags])).complement

    assert complement() == "random-except-vo"
    assert complement("--rotation", "per-layer") == "random-except-vo"
    assert complement("--complement", "random") == "random"
    assert complement("--rotation", "none") == "pca"
    assert complement("--complement", "pca") == "pca"
    with pytest.raises(SystemExit) as exit_info:
        quantize_main(["model", "out", "--rotation", "none", "--complement", "random"])
    assert exit_info.value.code == 2
    assert "rotation 'none' has none" in capsys.readouterr().err


def test_cli_online_rotation_flag_reaches_the_quant_config(capsys) -> None:
    """``--no-online-rotation`` drops down_proj's online rotation from the checkpoint's config (absorbed only)."""
    parser = quantize_parser()

    def online(*flags: str) -> tuple[str, ...]:
        return quantize_options(parser.parse_args(["model", "out", *flags])).quant_config().online_rotation

    assert online() == ("down_proj",)
    assert online("--no-online-rotation") == ()
    with pytest.raises(SystemExit) as exit_info:
        quantize_main(["model", "out", "--rotation", "per-layer", "--no-online-rotation"])
    assert exit_info.value.code == 2
    assert "online_rotation=False applies to rotation 'absorbed' only" in capsys.readouterr().err
