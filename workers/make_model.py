"""Build small random Hugging Face checkpoints locally (tests, benchmarks, the demo model).

The checkpoint is a ``transformers`` config plus seeded random weights written by
``save_pretrained`` (safetensors), so Hugging Face loads it exactly; the tokenizer is a byte-level
BPE trained on the corpus shipped in ``workers/data/`` (trained once, cached by corpus hash).
"""
from __future__ import annotations

import hashlib
import inspect
import logging
import os
import pathlib
import shutil
import tempfile
from typing import Any

import torch

logger = logging.getLogger(__name__)

CORPUS_PATH = pathlib.Path(__file__).parent / "data" / "corpus.txt"
CACHE_DIR_ENV = "RAYLM_CACHE_DIR"
TOKENIZER_VOCAB_SIZE = 2048
BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, ROLE_TOKEN = "<|begin|>", "<|end|>", "<|pad|>", "<|start|>"
SPECIAL_TOKENS = [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, ROLE_TOKEN]
# One turn = "<|start|>role\ncontent<|end|>\n"; the assistant ends its turn with the eos token.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|start|>' + message['role'] + '\\n' + message['content'] + '<|end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start|>assistant\\n' }}{% endif %}"
)

ARCHS = ("llama", "mistral", "qwen2", "qwen3")
PRESETS = ("tiny", "demo", "bench")

_PRESET_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096),
    "demo": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096),
    "bench": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096,
                  vocab_size=32000),
}

# What each architecture exercises (the tiny preset keeps these; larger presets keep all but MQA).
_ARCH_FEATURES: dict[str, dict[str, Any]] = {
    # Llama 3.x rope scaling; low frequencies are rescaled within a few hundred positions.
    "llama": dict(rope_theta=10000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=1024)),
    "mistral": dict(sliding_window=None),  # MQA on tiny (see make_model)
    "qwen2": dict(tie_word_embeddings=True, use_sliding_window=False),  # qkv bias is built in
    "qwen3": dict(attention_bias=False, tie_word_embeddings=False),  # q/k norm is built in
}


def _config_class(arch: str):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    return {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config,
            "qwen3": Qwen3Config}[arch]


def train_tokenizer() -> pathlib.Path:
    """Train the byte-level BPE once per corpus version; returns the cached tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = CORPUS_PATH.read_bytes()
    key = hashlib.sha256(
        corpus + f"{TOKENIZER_VOCAB_SIZE}|{SPECIAL_TOKENS}|bpe-bytelevel-v1".encode()
    ).hexdigest()[:16]
    cached = pathlib.Path(tempfile.gettempdir()) / f"raylm-tokenizer-{key}" / "tokenizer.json"
    if cached.is_file():
        return cached
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(corpus.decode("utf-8").split("\n\n"), trainer)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".{os.getpid()}.tmp")
    tokenizer.save(str(tmp))
    os.replace(tmp, cached)  # atomic: concurrent builders never read a half-written file
    logger.info("trained a %d-token BPE tokenizer into %s", tokenizer.get_vocab_size(), cached)
    return cached


def make_tokenizer():
    """The project tokenizer as a ``transformers`` fast tokenizer with a chat template."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_file=str(train_tokenizer()), bos_token=BOS_TOKEN, eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN, chat_template=CHAT_TEMPLATE, model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )


def make_config(arch: str = "llama", preset: str = "tiny", **config_overrides: Any):
    """The ``transformers`` config of a random model (vocab sized to the tokenizer)."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    tokenizer = make_tokenizer()
    kwargs: dict[str, Any] = dict(vocab_size=len(tokenizer), rms_norm_eps=1e-6,
                                  initializer_range=0.02, dtype="float32")
    kwargs.update(_PRESET_SIZES[preset])
    kwargs.update(_ARCH_FEATURES[arch])
    if arch == "mistral" and preset == "tiny":
        kwargs["num_key_value_heads"] = 1
    if arch == "qwen3":
        kwargs["head_dim"] = 2 * kwargs["hidden_size"] // kwargs["num_attention_heads"]
    kwargs.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    kwargs.update(config_overrides)
    if kwargs["vocab_size"] < len(tokenizer):
        raise ValueError(
            f"vocab_size ({kwargs['vocab_size']}) must be >= the tokenizer size ({len(tokenizer)})"
        )
    config = _config_class(arch)(**kwargs)
    config.architectures = [config.__class__.__name__.replace("Config", "ForCausalLM")]
    return config


def _randomise_defaults(model: torch.nn.Module, generator: torch.Generator) -> None:
    """HF initialises biases to 0 and norm weights to 1; randomise them so that loading a
    bias or norm weight into the wrong place changes the logits (parity tests see it)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
            elif "norm" in name:
                param.copy_(1.0 + torch.randn(param.shape, generator=generator) * 0.1)


def make_model(out_dir: str | os.PathLike, arch: str = "llama", preset: str = "tiny",
               seed: int = 0, **config_overrides: Any) -> pathlib.Path:
    """Write a random ``arch`` checkpoint + tokenizer to ``out_dir``; deterministic per seed."""
    from transformers import AutoModelForCausalLM

    config = make_config(arch, preset, **config_overrides)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed + 1)
    _randomise_defaults(model, generator)
    save_kwargs: dict[str, Any] = {}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        save_kwargs["safe_serialization"] = True  # transformers 4.x; 5.x always writes safetensors
    model.save_pretrained(str(out), **save_kwargs)
    make_tokenizer().save_pretrained(str(out))
    num_params = sum(p.numel() for p in model.parameters())
    logger.info("wrote a random %s %s model (%.2fM parameters) to %s",
                arch, preset, num_params / 1e6, out)
    return out


def default_cache_dir() -> pathlib.Path:
    root = os.environ.get(CACHE_DIR_ENV)
    return pathlib.Path(root) if root else pathlib.Path.home() / ".cache" / "raylm"


def demo_model_dir() -> pathlib.Path:
    """The built-in demo model (a small random llama), built on first use and reused after."""
    target = default_cache_dir() / "demo-llama"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".demo-llama-", dir=target.parent))
    try:
        make_model(tmp, arch="llama", preset="demo", seed=0)
        try:
            os.rename(tmp, target)  # atomic; loses the race harmlessly if another process won
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("built the demo model in %s", target)
    return target
