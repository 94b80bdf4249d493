"""Tiny random Llama/Qwen2/Mistral checkpoints and a tiny tokenizer, built offline for tests.

Not a test module: pytest fixtures call :func:`make_tiny_model` to get a real on-disk
checkpoint (safetensors + tokenizer + generation config) that transformers and vLLM load.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

# An explicit unk token: otherwise transformers' Qwen2Tokenizer (which AutoTokenizer picks for
# model_type qwen2) appends its default "<|endoftext|>" as token 512, beyond the embedding.
BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
VOCAB_SIZE = 512
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CONFIGS: dict[str, type[PretrainedConfig]] = {
    "llama": LlamaConfig,
    "qwen2": Qwen2Config,
    "mistral": MistralConfig,
}
_SUBJECTS = ["the cat", "a small dog", "my friend", "the old man", "our teacher", "the bird",
             "a young girl", "the farmer", "this machine", "the river", "every student"]
_VERBS = ["sees", "likes", "finds", "carries", "watches", "follows", "builds", "paints",
          "remembers", "opens", "reads", "answers"]
_OBJECTS = ["a red ball", "the green house", "an apple", "the long road", "a quiet song",
            "the blue sky", "a warm cup of tea", "the heavy box", "a new book", "the window"]
_PARAGRAPH = (
    "Quantization stores the weights of a neural network with fewer bits. A rotation spreads "
    "outliers across many channels, which makes the remaining values easier to round. "
    "Researchers measure perplexity on held-out text: lower numbers mean better predictions. "
    "Yesterday, twelve engineers travelled from London to Paris by train; they discussed "
    "kernels, memory bandwidth, throughput and latency while drinking coffee. Jupiter, Saturn, "
    "Uranus and Neptune are giant planets. Mathematics, physics, chemistry and biology explain "
    "why bridges stand, why oxygen burns, and why children grow quickly during summer."
)
_ENDINGS = ["in the morning", "after lunch", "near the lake", "every day", "with great care",
            "before the rain", "on Sunday", "at night", "without a word", "in the garden"]


def _corpus(n_sentences: int = 400, seed: int = 0) -> list[str]:
    """Return a few KB of deterministic English text (plus the chat template's role words)."""
    rng = random.Random(seed)
    sentences = [
        f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} "
        f"{rng.choice(_ENDINGS)}.".capitalize()
        for _ in range(n_sentences)
    ]
    return [*sentences, _PARAGRAPH, "<|system|> <|user|> <|assistant|> What is 2 + 2? It is 4."]


def calibration_corpus(n_sentences: int = 1000, seed: int = 1) -> str:
    """Return English text for calibrating tiny models (~10k tiny-tokenizer tokens).

    Drawn with a different seed from the tokenizer's training text.
    """
    return " ".join(_corpus(n_sentences, seed))


def train_tokenizer(out_dir: Path) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (vocab ``VOCAB_SIZE``) and save it to ``out_dir``.

    Plain encodes start with BOS (like Llama); the chat template writes BOS itself, as
    ``apply_chat_template`` and vLLM's chat endpoint tokenize without special tokens.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[BOS, EOS, PAD, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tokenizer.token_to_id(BOS))]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        model_max_length=512,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    wrapped.save_pretrained(out_dir)
    return wrapped


def _tiny_config(arch: str, tokenizer: PreTrainedTokenizerFast, num_layers: int = 2) -> PretrainedConfig:
    """Return a 2-layer, hidden-128 config of ``arch`` (GQA 4:2, head_dim 32: vLLM's CPU attention needs >= 32)."""
    if arch not in CONFIGS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(CONFIGS)}")
    return CONFIGS[arch](
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=512,
        tie_word_embeddings=arch == "llama",  # llama exercises untying tied embeddings
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _perturb(model: PreTrainedModel, generator: torch.Generator) -> None:
    """Make the default init non-trivial: RMSNorm gains in [0.5, 1.5], non-zero q/k/v biases."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.weight.uniform_(0.5, 1.5, generator=generator)
            elif name.endswith(("q_proj", "k_proj", "v_proj")) and module.bias is not None:
                module.bias.normal_(0.0, 0.1, generator=generator)


def make_tiny_model(arch: str, out_dir: Path, seed: int = 0, num_layers: int = 2) -> Path:
    """Build a random tiny ``arch`` model ("llama", "qwen2" or "mistral") in ``out_dir``.

    Saves float32 safetensors, the tokenizer (with chat template) and a generation config;
    the result is deterministic for a given ``seed``.
    """
    out_dir = Path(out_dir)
    tokenizer = train_tokenizer(out_dir)
    config = _tiny_config(arch, tokenizer, num_layers)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _perturb(model, torch.Generator().manual_seed(seed))
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out_dir)
    return out_dir
