"""End to end: the engine on the Triton backend (interpreter on CPU) gives the torch backend's tokens."""
import pytest

from hf_reference import random_prompts
from raylm.cluster import LLM, SamplingParams


@pytest.mark.slow
def test_triton_backend_matches_torch_backend(tiny_model, monkeypatch):
    path = str(tiny_model("llama"))
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    monkeypatch.setenv("RAYLM_ATTENTION_BACKEND", "torch")
    ref_llm = LLM(path, dtype="float32", max_num_batched_tokens=32)
    prompts = random_prompts(ref_llm.engine.vocab_size, [3, 17, 40], seed=20)
    ref = [o.outputs[0].token_ids for o in ref_llm.generate(prompts, params)]
    monkeypatch.setenv("RAYLM_ATTENTION_BACKEND", "triton")
    # A small token budget forces chunked prefill mixed with decodes in one launch.
    llm = LLM(path, dtype="float32", max_num_batched_tokens=32)
    assert llm.executor_info["attention_backend"] == "triton"
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert got == ref
    llm.check_integrity()
