"""The local model builder: checkpoints Hugging Face loads, and a usable tokenizer."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from raylm.workers.make_model import demo_model_dir, make_config, make_model

TEXTS = [
    "Hello, world!",
    "  leading spaces and\ttabs\nnew lines\n\n",
    "def f(x):\n    return x * 2  # comment",
    "Unicode: café, Zürich, 東京, Москва, 🙂 and ∑ symbols.",
    "",
]


def test_tokenizer_round_trips_text(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model("llama")))
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
    # The tokenizer was trained: common English words are single tokens, not bytes.
    assert len(tokenizer.encode(" the river and the city", add_special_tokens=False)) <= 6


def test_tokenizer_special_tokens_and_chat_template(tiny_model):
    from transformers import AutoConfig, AutoTokenizer

    path = tiny_model("qwen3")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    config = AutoConfig.from_pretrained(str(path))
    assert tokenizer.eos_token_id == config.eos_token_id
    assert tokenizer.bos_token_id == config.bos_token_id
    assert tokenizer.pad_token_id == config.pad_token_id
    assert len(tokenizer) <= config.vocab_size
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == ("<|start|>system\nBe brief.<|end|>\n<|start|>user\nHi!<|end|>\n"
                      "<|start|>assistant\n")
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids.count(tokenizer.eos_token_id) == 2  # special tokens are atomic, not spelled out
    assert max(ids) < config.vocab_size


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_hf_loads_the_checkpoint_with_the_arch_features(tiny_model, arch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model(arch)), dtype=torch.float32)
    cfg = model.config
    assert cfg.architectures[0].lower().startswith(arch)
    assert cfg.max_position_embeddings >= 2048
    if arch == "llama":
        assert cfg.rope_parameters["rope_type"] == "llama3"
    if arch == "mistral":
        assert cfg.num_key_value_heads == 1
    if arch == "qwen2":
        assert cfg.tie_word_embeddings
        assert model.model.layers[0].self_attn.q_proj.bias.abs().sum() > 0
    if arch == "qwen3":
        assert cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits
    assert torch.isfinite(logits).all() and logits.std() > 0.01


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    a = load_file(str(make_model(tmp_path / "a", "mistral", seed=3) / "model.safetensors"))
    b = load_file(str(make_model(tmp_path / "b", "mistral", seed=3) / "model.safetensors"))
    c = load_file(str(make_model(tmp_path / "c", "mistral", seed=4) / "model.safetensors"))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])


def test_config_overrides_apply(tmp_path):
    from transformers import AutoConfig

    path = make_model(tmp_path, "llama", num_hidden_layers=3)
    assert AutoConfig.from_pretrained(str(path)).num_hidden_layers == 3


def test_bad_arch_or_preset_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="arch"):
        make_model(tmp_path, arch="gpt2")
    with pytest.raises(ValueError, match="preset"):
        make_model(tmp_path, preset="huge")


def test_bench_preset_is_about_50m_parameters():
    from transformers import AutoModelForCausalLM

    config = make_config("llama", "bench")
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (8, 512, 32000)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert 40e6 < sum(p.numel() for p in model.parameters()) < 60e6


def test_demo_model_is_built_once_and_reused(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("RAYLM_CACHE_DIR", str(tmp_path))
    path = demo_model_dir()
    assert path == tmp_path / "demo-llama"
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert demo_model_dir() == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == ["demo-llama"]  # no temp dirs left behind
    model = AutoModelForCausalLM.from_pretrained(str(path))
    assert model.config.hidden_size > 64
