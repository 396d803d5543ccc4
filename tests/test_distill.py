"""`raylm distill` on tiny models: a few hundred steps raise the held-out greedy acceptance,
the output is a normal checkpoint (raylm greedy == HF generate), a draft cut from the target
reproduces the target's first layers, and the CLI runs end to end."""
import json

import pytest
import torch

from hf_reference import hf_greedy, random_prompts
from raylm.cluster import LLM, SamplingParams
from raylm.cluster.distill import DistillConfig, run_distill
from raylm.workers.distill.config import TrainConfig


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small gain nothing from intra-op threads, and on a busy 2-core CI machine
    spinning OpenMP threads make each training step ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def weak_pair(tmp_path_factory):
    """A 1-layer draft under a 3-layer target whose extra layers write a lot into the
    residual stream: the raw draft agrees with the target's argmax only ~half the time."""
    from raylm.workers.make_pair import make_spec_pair

    target, draft = make_spec_pair(tmp_path_factory.mktemp("weak-pair"), preset="tiny",
                                   extra_layers=2, residual_scale=0.5, num_hidden_layers=1)
    return str(target), str(draft)


@pytest.fixture(scope="module")
def distilled(weak_pair, tmp_path_factory):
    target, draft = weak_pair
    cfg = DistillConfig(
        target=target, draft_init=draft, out=str(tmp_path_factory.mktemp("distilled")),
        regen_every=20, num_rollouts=64, max_new_tokens=32, num_eval_prompts=16,
        eval_max_tokens=32, eval_every=100, seed=0,
        train=TrainConfig(steps=300, loss="fkl", lr=1e-3, warmup_steps=10, batch_size=8))
    return run_distill(cfg, progress=False)


def test_distillation_raises_held_out_greedy_acceptance(distilled):
    before, after = distilled.before, distilled.after
    assert before.acceptance_rate < 0.35  # a poor draft to start with
    assert after.acceptance_rate > before.acceptance_rate + 0.1
    assert after.mean_acceptance_length > before.mean_acceptance_length + 0.3
    assert after.agreement > before.agreement + 0.1
    log = json.loads(distilled.log_path.read_text())
    assert len(log["loss"]) == 300 and [e["step"] for e in log["eval"]] == [0, 100, 200, 300]
    assert sum(log["loss"][-50:]) < sum(log["loss"][:50])
    assert distilled.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_distilled_checkpoint_passes_hf_parity(distilled):
    path = str(distilled.out)
    llm = LLM(path, dtype="float32")
    prompts = random_prompts(llm.engine.vocab_size, [5, 12, 23], seed=3)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    for prompt, out in zip(prompts, llm.generate(prompts, params)):
        assert out.outputs[0].token_ids == hf_greedy(path, prompt, 16)
    llm.shutdown()


def test_distilled_draft_speculates_for_its_target(weak_pair, distilled):
    """The engine's own acceptance counter agrees: the distilled draft is accepted more."""
    target, draft = weak_pair
    prompts = random_prompts(2000, [8, 8, 8, 8], seed=5)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    rates = []
    for d in (draft, str(distilled.out)):
        llm = LLM(target, dtype="float32", speculative_config={
            "model": d, "num_speculative_tokens": 4, "adaptive": False})
        llm.generate(prompts, params)
        rates.append(llm.get_stats()["spec_acceptance_rate"])
    assert rates[1] > rates[0] + 0.05, rates


def test_draft_layers_preset_is_the_targets_first_layers(weak_pair, tmp_path):
    """make_pair's target is its draft plus layers, so cutting the target back to 1 layer must
    give the draft exactly (embedding, layer 0, final norm and head)."""
    from raylm.workers.distill.hf_models import draft_from_target, load_causal_lm

    target, draft = weak_pair
    cut = draft_from_target(load_causal_lm(target, "cpu", trainable=False), 1)
    ref = load_causal_lm(draft, "cpu", trainable=False)
    ids = torch.tensor([random_prompts(2000, [10], seed=1)[0]])
    with torch.inference_mode():
        assert torch.equal(cut(ids).logits, ref(ids).logits)
    with pytest.raises(ValueError, match="draft_layers"):
        draft_from_target(load_causal_lm(target, "cpu", trainable=False), 3)


def test_cli_end_to_end(weak_pair, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raylm.cluster.cli import main

    target, _ = weak_pair
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt" if i % 2 else "text": f"Story {i}: once"})
                                 for i in range(12)))
    out = tmp_path / "draft"
    rc = main(["distill", "--target", target, "--draft-layers", "1", "--out", str(out),
               "--prompts", str(prompts), "--steps", "6", "--eval-every", "3",
               "--regen-every", "3", "--num-rollouts", "4", "--num-eval-prompts", "4",
               "--max-new-tokens", "8", "--eval-max-tokens", "8", "--loss", "jsd",
               "--data-policy", "target", "--grad-accum", "2", "--batch-size", "2",
               "--save-every", "3", "--freeze-embeddings", "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "acceptance rate" in text and "mean acceptance length" in text
    for name in ("config.json", "model.safetensors", "tokenizer.json", "distill_log.json",
                 "distill_curve.png", "checkpoints/step-3/model.safetensors"):
        assert (out / name).is_file(), name
    model = AutoModelForCausalLM.from_pretrained(str(out))
    reference = AutoModelForCausalLM.from_pretrained(target)
    assert model.config.num_hidden_layers == 1
    # Frozen: the head is still the target's; the layer it kept has trained.
    assert torch.equal(model.lm_head.weight, reference.lm_head.weight)
    assert not torch.equal(model.model.layers[0].mlp.down_proj.weight,
                           reference.model.layers[0].mlp.down_proj.weight)
    AutoTokenizer.from_pretrained(str(out))
    out_ids = LLM(str(out), dtype="float32").generate([[5, 6, 7]], SamplingParams(max_tokens=4))
    assert len(out_ids[0].outputs[0].token_ids) == 4
    bad = main(["distill", "--target", target, "--draft-layers", "1", "--out", str(out),
                "--steps", "0"])
    assert bad == 2 and "steps" in capsys.readouterr().err
