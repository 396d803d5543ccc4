"""Lossless sampling end to end: with a draft model whose distribution differs from the
target's, the 2nd and 3rd generated tokens have the target's exact marginals, computed by
enumeration with Hugging Face (top_k=4 keeps the support small: 4 first tokens, 16 contexts for
the third). The same test with an "always accept" verifier fails, so it has the power to see a
lossy sampler."""
import pytest
import torch

from test_sampler import P_VALUE_TOLERANCE, chi_square_p_value
from hf_reference import hf_model
from raylm.cluster import LLM, SamplingParams

PROMPT = [5, 17, 99, 300, 41, 7]
TOP_K, NUM_REQUESTS = 4, 1500

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from raylm.workers.make_pair import make_spec_pair

    # A large residual scale: the draft disagrees often, so rejections and resampling matter.
    target, draft = make_spec_pair(tmp_path_factory.mktemp("lossy-pair"), extra_layers=2,
                                   residual_scale=0.6)
    return str(target), str(draft)


def _top_k_probs(logits: torch.Tensor) -> torch.Tensor:
    values, ids = logits.topk(TOP_K)
    probs = torch.zeros_like(logits)
    probs[ids] = values.softmax(-1)
    return probs.double()


def _exact_marginals(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """P(token 2 = x) and P(token 3 = x) under the target with top_k=TOP_K, temperature 1."""
    model = hf_model(path)
    with torch.inference_mode():
        p1 = _top_k_probs(model(torch.tensor([PROMPT])).logits[0, -1].float())
        firsts = p1.nonzero().flatten().tolist()
        ctx2 = torch.tensor([PROMPT + [a] for a in firsts])
        p2_given = [_top_k_probs(row.float()) for row in model(ctx2).logits[:, -1]]
        marg2 = sum(p1[a] * p for a, p in zip(firsts, p2_given))
        pairs = [(a, b) for a, p in zip(firsts, p2_given) for b in p.nonzero().flatten().tolist()]
        ctx3 = torch.tensor([PROMPT + [a, b] for a, b in pairs])
        logits3 = model(ctx3).logits[:, -1]
        marg3 = sum(p1[a] * p2_given[firsts.index(a)][b] * _top_k_probs(row.float())
                    for (a, b), row in zip(pairs, logits3))
    return marg2, marg3


def _sample(llm: LLM) -> torch.Tensor:
    params = [SamplingParams(temperature=1.0, top_k=TOP_K, max_tokens=3, ignore_eos=True, seed=i)
              for i in range(NUM_REQUESTS)]
    outs = llm.generate([PROMPT] * NUM_REQUESTS, params)
    return torch.tensor([o.outputs[0].token_ids for o in outs])  # [N, 3]


def _p_values(tokens: torch.Tensor, marg2, marg3) -> tuple[float, float]:
    """Chi-square p-values of tokens 2 and 3; 0 when a token outside the support came out."""
    vocab = marg2.shape[0]
    values = []
    for column, marg in ((1, marg2), (2, marg3)):
        counts = torch.bincount(tokens[:, column], minlength=vocab)
        values.append(chi_square_p_value(counts, marg) if counts[marg == 0].sum() == 0 else 0.0)
    return values[0], values[1]


def test_draft_speculation_keeps_the_targets_marginals(pair):
    target, draft = pair
    llm = LLM(target, dtype="float32", enable_prefix_caching=False,
              speculative_config={"model": draft, "num_speculative_tokens": 2,
                                  "adaptive": False})
    tokens = _sample(llm)
    stats = llm.get_stats()
    assert 0 < stats["spec_num_accepted_tokens"] < stats["spec_num_draft_tokens"]  # both paths
    p2, p3 = _p_values(tokens, *_exact_marginals(target))
    print(f"p-values: token 2 {p2:.3g}, token 3 {p3:.3g}; acceptance "
          f"{stats['spec_acceptance_rate']:.2f}")
    assert p2 > P_VALUE_TOLERANCE and p3 > P_VALUE_TOLERANCE


def test_an_always_accept_verifier_is_caught(pair, monkeypatch):
    from raylm.workers import rejection_sampler

    def always_accept(draft_token_ids, target_probs, *args, **kwargs):
        num_seqs, k = draft_token_ids.shape
        bonus = target_probs[:, k].argmax(dim=1, keepdim=True)
        return torch.cat([draft_token_ids, bonus], 1), torch.full((num_seqs,), k + 1)

    monkeypatch.setattr(rejection_sampler, "rejection_sample", always_accept)
    target, draft = pair
    llm = LLM(target, dtype="float32", enable_prefix_caching=False,
              speculative_config={"model": draft, "num_speculative_tokens": 2,
                                  "adaptive": False})
    p2, p3 = _p_values(_sample(llm), *_exact_marginals(target))
    assert min(p2, p3) < 1e-6
