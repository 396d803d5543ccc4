"""Batched sampler: parity with Hugging Face logits processors, exact sampling, seeds, logprobs."""
from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from raylm.workers.logits_processors import (
    apply_penalties,
    apply_temperature,
    apply_top_k_top_p_min_p,
    compute_logprobs,
    mask_token_ids,
    pad_token_ids,
)
from raylm.workers.model_input import SamplingMetadata
from raylm.workers.sampler import Sampler, to_model_output

# A chi-square test fails when its p-value is below this (fixed seeds: the tests are deterministic).
P_VALUE_TOLERANCE = 1e-3
NUM_DRAWS = 20_000


def make_meta(num_rows: int, **per_row: list) -> SamplingMetadata:
    fields = dict(
        temperature=[1.0] * num_rows,
        top_k=[0] * num_rows,
        top_p=[1.0] * num_rows,
        min_p=[0.0] * num_rows,
        repetition_penalty=[1.0] * num_rows,
        presence_penalty=[0.0] * num_rows,
        frequency_penalty=[0.0] * num_rows,
        seeds=[None] * num_rows,
        step_ids=[0] * num_rows,
        num_logprobs=[-1] * num_rows,
    )
    fields.update(per_row)
    meta = SamplingMetadata(**fields)
    if meta.needs_penalties and meta.prompt_token_ids is None:
        meta.prompt_token_ids = [[] for _ in range(num_rows)]
        meta.output_token_ids = [[] for _ in range(num_rows)]
    return meta


def hf_process(
    logits: torch.Tensor,  # [vocab]
    history: list[int],
    output: list[int],
    *,
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
) -> torch.Tensor:  # [vocab]
    """One row through HF's processors (plus the OpenAI penalty formula, which HF lacks)."""
    scores = logits.unsqueeze(0).clone()
    ids = torch.tensor([history], dtype=torch.int64)
    if repetition_penalty != 1.0 and history:
        scores = RepetitionPenaltyLogitsProcessor(repetition_penalty)(ids, scores)
    counts = torch.bincount(torch.tensor(output, dtype=torch.int64), minlength=logits.shape[0]).float()
    scores = scores - frequency_penalty * counts - presence_penalty * (counts > 0).float()
    scores = TemperatureLogitsWarper(temperature)(ids, scores)
    if top_k > 0:
        scores = TopKLogitsWarper(top_k)(ids, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(ids, scores)
    if min_p > 0.0:
        scores = MinPLogitsWarper(min_p)(ids, scores)
    return scores[0]


def assert_same_filtered_logits(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    finite = torch.isfinite(ref)
    torch.testing.assert_close(ours[finite], ref[finite], rtol=1e-5, atol=1e-5)


ROW_PARAMS = [
    dict(),
    dict(repetition_penalty=1.3),
    dict(repetition_penalty=0.8, temperature=0.7),
    dict(presence_penalty=0.5, frequency_penalty=0.3),
    dict(temperature=1.5, top_k=5),
    dict(top_p=0.8),
    dict(temperature=0.6, top_k=20, top_p=0.7),
    dict(min_p=0.1),
    dict(
        repetition_penalty=1.2, frequency_penalty=-0.4, temperature=0.9, top_k=40, top_p=0.95, min_p=0.05
    ),
    dict(top_k=1),
    dict(top_p=0.05),
    dict(top_k=1000),  # larger than the vocabulary: off
]


@pytest.mark.parametrize("use_top_p", [True, False], ids=["top_p_path", "topk_path"])
def test_processors_match_hf_per_row_in_one_batch(use_top_p: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    vocab, rows = 256, ROW_PARAMS
    if not use_top_p:
        rows = [{k: v for k, v in r.items() if k != "top_p"} for r in ROW_PARAMS]
    logits = torch.randn(len(rows), vocab, generator=gen) * 3  # [num_rows, vocab]
    def histories() -> list[list[int]]:
        lengths = torch.randint(0, 30, (len(rows),), generator=gen).tolist()
        return [torch.randint(vocab, (n,), generator=gen).tolist() for n in lengths]

    prompts, outputs = histories(), histories()

    def column(name: str, default: float) -> list:
        return [r.get(name, default) for r in rows]

    ours = apply_penalties(
        logits,
        pad_token_ids(prompts, vocab),
        pad_token_ids(outputs, vocab),
        torch.tensor(column("repetition_penalty", 1.0)),
        torch.tensor(column("presence_penalty", 0.0)),
        torch.tensor(column("frequency_penalty", 0.0)),
    )
    ours = apply_temperature(ours, torch.tensor(column("temperature", 1.0)))
    ours = apply_top_k_top_p_min_p(
        ours,
        top_k=torch.tensor(column("top_k", 0)),
        top_p=torch.tensor(column("top_p", 1.0), dtype=torch.float64) if use_top_p else None,
        min_p=torch.tensor(column("min_p", 0.0)),
    )
    for i, params in enumerate(rows):
        ref = hf_process(logits[i], prompts[i] + outputs[i], outputs[i], **params)
        assert_same_filtered_logits(ours[i], ref)


def test_penalties_touch_only_the_histories_and_match_the_dense_formula() -> None:
    """The gather/scatter penalties equal, bit for bit, the dense formula over [rows, vocab]."""
    gen = torch.Generator().manual_seed(11)
    rows, vocab = 9, 5000
    logits = torch.randn(rows, vocab, generator=gen) * 4
    prompts = [torch.randint(vocab, (int(n),), generator=gen).tolist()
               for n in torch.randint(0, 40, (rows,), generator=gen)]
    outputs = [torch.randint(60, (int(n),), generator=gen).tolist()  # many repeats
               for n in torch.randint(0, 50, (rows,), generator=gen)]
    prompt_ids, output_ids = pad_token_ids(prompts, vocab), pad_token_ids(outputs, vocab)
    rep = torch.rand(rows, generator=gen) + 0.5
    presence, frequency = torch.randn(rows, generator=gen), torch.randn(rows, generator=gen)
    counts = torch.zeros(rows, vocab + 1).scatter_add_(
        1, output_ids, torch.ones_like(output_ids, dtype=torch.float32))[:, :vocab]
    seen = torch.zeros(rows, vocab + 1, dtype=torch.bool).scatter_(1, prompt_ids, True)[:, :vocab]
    seen |= counts > 0
    dense = torch.where(seen, torch.where(logits < 0, logits * rep[:, None], logits / rep[:, None]),
                        logits)
    dense = dense - frequency[:, None] * counts
    dense = dense - presence[:, None] * (counts > 0).float()
    ours = apply_penalties(logits, prompt_ids, output_ids, rep, presence, frequency)
    assert torch.equal(ours, dense)


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit over the tokens with non-zero probability."""
    support = probs > 0
    assert counts[~support].sum() == 0, "sampled a token whose probability is zero"
    expected = probs[support].double() * counts.sum()
    stat = ((counts[support].double() - expected) ** 2 / expected).sum()
    dof = int(support.sum()) - 1
    if dof == 0:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2))


STAT_CASES = [
    dict(temperature=1.0),
    dict(temperature=0.6),
    dict(temperature=2.0, top_k=4),
    dict(top_p=0.7),
    dict(temperature=1.3, min_p=0.15),
    dict(temperature=0.8, top_k=6, top_p=0.9, min_p=0.05),
    dict(repetition_penalty=1.5, presence_penalty=0.5, frequency_penalty=0.5, top_k=8),
]


@pytest.mark.parametrize("params", STAT_CASES, ids=[str(p) for p in STAT_CASES])
def test_samples_follow_the_processed_distribution(params: dict) -> None:
    vocab = 12
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(1)) * 1.5  # [vocab]
    prompt, output = [0, 3, 3], [5, 5, 5, 7]
    expected = torch.softmax(hf_process(logits, prompt + output, output, **params), dim=-1)

    meta = make_meta(NUM_DRAWS, **{k: [v] * NUM_DRAWS for k, v in params.items()})
    if meta.needs_penalties:
        meta.prompt_token_ids = [prompt] * NUM_DRAWS
        meta.output_token_ids = [output] * NUM_DRAWS
    torch.manual_seed(1234)
    sampled = Sampler()(logits.expand(NUM_DRAWS, vocab).contiguous(), meta).sampled_token_ids
    counts = torch.bincount(sampled, minlength=vocab)
    assert chi_square_p_value(counts, expected) > P_VALUE_TOLERANCE


def test_seeded_rows_follow_the_distribution_across_steps() -> None:
    # One seed, many steps: each step's draw is fresh randomness from the same distribution.
    vocab, num = 10, 5_000
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(2))
    meta = make_meta(num, temperature=[0.9] * num, seeds=[42] * num, step_ids=list(range(num)))
    sampled = Sampler()(logits.expand(num, vocab).contiguous(), meta).sampled_token_ids
    expected = torch.softmax(logits / 0.9, dim=-1)
    assert chi_square_p_value(torch.bincount(sampled, minlength=vocab), expected) > P_VALUE_TOLERANCE


def test_greedy_rows_take_the_argmax_of_penalized_logits() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 50, generator=gen)
    meta = make_meta(
        6,
        temperature=[0.0, 0.7, 0.0, 1.0, 0.0, 0.0],
        top_k=[0, 5, 3, 0, 0, 0],  # ignored by greedy rows
        repetition_penalty=[1.0, 1.0, 1.0, 1.0, 2.0, 1.0],
        presence_penalty=[0.0, 0.0, 0.0, 0.0, 0.0, 1.5],
    )
    top = logits.argmax(dim=-1)
    meta.prompt_token_ids = [[] for _ in range(6)]
    meta.output_token_ids = [[] for _ in range(6)]
    meta.prompt_token_ids[4] = [int(top[4])]  # penalized away from its argmax
    meta.output_token_ids[5] = [int(top[5])]
    ref4 = hf_process(logits[4], [int(top[4])], [], repetition_penalty=2.0).argmax()
    sampled = Sampler()(logits, meta).sampled_token_ids
    assert sampled[0] == top[0] and sampled[2] == top[2]
    assert sampled[4] == ref4
    assert sampled[5] == (logits[5] - 1.5 * torch.nn.functional.one_hot(top[5], 50)).argmax()

    all_greedy = make_meta(6, temperature=[0.0] * 6)
    torch.testing.assert_close(Sampler()(logits, all_greedy).sampled_token_ids, top)


def test_seeded_rows_reproduce_alone_or_in_a_batch() -> None:
    vocab = 1000
    gen = torch.Generator().manual_seed(4)
    row = torch.randn(vocab, generator=gen)
    seeded = dict(temperature=0.8, top_k=0, top_p=1.0, min_p=0.0, seed=7)
    sampler = Sampler()
    alone = []
    for step in range(20):
        meta = make_meta(1, temperature=[0.8], seeds=[7], step_ids=[step])
        alone.append(int(sampler(row.unsqueeze(0), meta).sampled_token_ids[0]))
    assert len(set(alone)) > 1  # steps draw fresh randomness

    # The same row at position 9 of 16, the others differing in every parameter.
    num = 16
    others = torch.randn(num, vocab, generator=gen)
    for step in range(20):
        logits = others.clone()
        logits[9] = row
        meta = make_meta(
            num,
            temperature=[0.0 if i % 4 == 0 else 1.1 for i in range(num)],
            top_k=[5 if i % 3 == 0 else 0 for i in range(num)],
            top_p=[0.9 if i % 5 == 0 else 1.0 for i in range(num)],
            min_p=[0.1 if i % 7 == 0 else 0.0 for i in range(num)],
            repetition_penalty=[1.2 if i % 2 else 1.0 for i in range(num)],
            seeds=[None if i % 2 else i * 11 for i in range(num)],
            step_ids=[step + i for i in range(num)],
            num_logprobs=[3 if i % 3 else -1 for i in range(num)],
            prompt_token_ids=[[1, 2, 3]] * num,
            output_token_ids=[[4]] * num,
        )
        for name in ("temperature", "top_k", "top_p", "min_p"):
            getattr(meta, name)[9] = seeded[name]
        meta.repetition_penalty[9], meta.seeds[9], meta.step_ids[9] = 1.0, 7, step
        torch.manual_seed(step)  # the engine RNG differs from the runs above
        assert int(sampler(logits, meta).sampled_token_ids[9]) == alone[step]


def test_logprobs_are_raw_log_softmax_with_chosen_token_first() -> None:
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 30, generator=gen)
    meta = make_meta(
        4,
        temperature=[0.0, 0.5, 1.0, 1.0],
        top_k=[0, 3, 0, 0],
        repetition_penalty=[1.0, 1.0, 1.5, 1.0],
        num_logprobs=[0, 5, -1, 2],
        prompt_token_ids=[[], [], [1, 2], []],
        output_token_ids=[[], [], [3], []],
    )
    before = logits.clone()
    out = Sampler()(logits, meta)
    assert torch.equal(logits, before)  # the caller's logits are not modified
    raw = torch.log_softmax(logits, dim=-1)
    assert out.logprob_token_ids.shape == out.logprobs.shape == (4, 6)
    torch.testing.assert_close(out.logprob_token_ids[:, 0], out.sampled_token_ids)
    torch.testing.assert_close(out.logprobs[:, 0], raw.gather(1, out.sampled_token_ids[:, None])[:, 0])
    top_values, top_ids = raw.topk(5, dim=-1)
    torch.testing.assert_close(out.logprob_token_ids[:, 1:], top_ids)
    torch.testing.assert_close(out.logprobs[:, 1:], top_values)
    torch.testing.assert_close(compute_logprobs(logits), raw)

    host = to_model_output(out, meta)
    assert host.sampled_token_ids == out.sampled_token_ids.tolist()
    assert host.logprobs[2] is None
    assert [len(host.logprobs[i][0]) for i in (0, 1, 3)] == [1, 6, 3]

    no_logprobs = Sampler()(logits, make_meta(4))
    assert no_logprobs.logprobs is None and no_logprobs.logprob_token_ids is None


def test_banned_tokens_are_never_sampled() -> None:
    logits = torch.zeros(3, 8)
    logits[:, 2] = 10.0  # the favourite, e.g. EOS before min_tokens
    meta = make_meta(3, temperature=[0.0, 1.0, 1.0], seeds=[None, None, 3])
    banned = [[2], [2, 5], []]
    for _ in range(20):
        sampled = Sampler()(logits, meta, banned_token_ids=banned).sampled_token_ids
        assert sampled[0] != 2 and sampled[1] not in (2, 5)
    assert int(Sampler()(logits, make_meta(3, temperature=[0.0] * 3), banned).sampled_token_ids[2]) == 2


def test_top_k_top_p_extremes_keep_only_the_best_token() -> None:
    logits = torch.randn(64, 20, generator=torch.Generator().manual_seed(6))
    best = logits.argmax(dim=-1)
    for params in (dict(top_k=[1] * 64), dict(top_p=[1e-6] * 64), dict(min_p=[1.0] * 64)):
        sampled = Sampler()(logits, make_meta(64, temperature=[5.0] * 64, **params)).sampled_token_ids
        assert torch.equal(sampled, best), params


def test_mask_token_ids_sets_only_the_listed_ids():
    """Banned ids (min_tokens' EOS, bad words) go to -inf; ids outside the vocabulary, repeats
    and rows with nothing listed are harmless; the input is not modified."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g)
    before = logits.clone()
    banned = [[1, 1, 49], [], [0, 50, -3, 7], [2]]
    got = mask_token_ids(logits, banned)
    expected = logits.clone()
    for r, row in enumerate(banned):
        for t in row:
            if 0 <= t < 50:
                expected[r, t] = float("-inf")
    assert torch.equal(got, expected) and torch.equal(logits, before)
    assert int(got.isinf().sum()) == 5
    assert torch.equal(mask_token_ids(logits, [[], [], [], []]), logits)


def test_argmax_only_holds_only_for_plain_greedy_rows():
    """The runner fuses the LM head and the pick (skipping this sampler) only when every row is
    plain greedy: any row asking for randomness, logprobs, a penalty, a grammar or a ban keeps
    the sampler."""
    greedy = [0.0, 0.0]
    assert make_meta(2, temperature=greedy).argmax_only
    assert not make_meta(2, temperature=[0.0, 0.7]).argmax_only
    assert not make_meta(2, temperature=greedy, num_logprobs=[-1, 0]).argmax_only
    assert not make_meta(2, temperature=greedy, presence_penalty=[0.0, 0.5]).argmax_only
    assert not make_meta(2, temperature=greedy, repetition_penalty=[1.2, 1.0]).argmax_only
    assert not make_meta(2, temperature=greedy, banned_token_ids=[[], [3]]).argmax_only
    assert make_meta(2, temperature=greedy, banned_token_ids=[[], []]).argmax_only
    assert not make_meta(2, temperature=greedy, grammar_rows=[1]).argmax_only
