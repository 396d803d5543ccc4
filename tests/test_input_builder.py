"""The step's sampling metadata, built column-wise, says per row what a per-row walk says:
greedy rows, n > 1 rows (one seed stream each), verification rows (successive positions),
min_tokens bans and penalty histories."""
from raylm.cluster.decoding import make_decoder
from raylm.cluster.input_builder import SampleGroup, _banned_ids, build_sampling_metadata
from raylm.cluster.request import Request
from raylm.cluster.sampling_params import SamplingParams


def _seq(params: SamplingParams, prompt_len: int = 5, num_output: int = 2):
    req = Request(f"r{id(params)}", None, list(range(1, prompt_len + 1)), params,
                  eos_token_ids=[0])
    req.decoder = make_decoder(req)
    seq = req.seqs[0]
    seq.token_ids.extend(range(100, 100 + num_output))
    return seq


def _per_row(groups):
    """The row-by-row definition the columns must equal."""
    rows = []
    for g in groups:
        seq, p, dec = g.seq, g.seq.request.params, g.seq.request.decoder
        greedy = dec.is_greedy_row(seq)
        for i in range(g.num_rows):
            step = seq.num_output_tokens + (i if g.spec_token_ids else 0)
            stream = seq.index + (0 if g.spec_token_ids else i)
            rows.append(dict(
                temperature=0.0 if greedy else p.temperature, top_k=0 if greedy else p.top_k,
                top_p=1.0 if greedy else p.top_p, min_p=0.0 if greedy else p.min_p,
                repetition_penalty=p.repetition_penalty, presence_penalty=p.presence_penalty,
                frequency_penalty=p.frequency_penalty,
                seeds=None if p.seed is None else p.seed * 1_000_003 + stream, step_ids=step,
                num_logprobs=dec.num_logprobs(seq), banned=_banned_ids(seq, step)))
    return rows


def test_columns_equal_the_per_row_definition():
    groups = [
        SampleGroup(_seq(SamplingParams(temperature=0.0)), 0, 1),
        SampleGroup(_seq(SamplingParams(temperature=0.7, top_p=0.9, seed=11, n=3)), 1, 3),
        SampleGroup(_seq(SamplingParams(temperature=0.5, top_k=5, min_tokens=9,
                                        stop_token_ids=[42], logprobs=2)), 4, 1),
        SampleGroup(_seq(SamplingParams(temperature=0.9, seed=3)), 5, 3, (7, 8)),
        SampleGroup(_seq(SamplingParams(temperature=1.0, repetition_penalty=1.3)), 8, 1),
    ]
    meta = build_sampling_metadata(groups)
    rows = _per_row(groups)
    assert meta.num_rows == len(rows) == 9
    for field in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                  "presence_penalty", "frequency_penalty", "seeds", "step_ids", "num_logprobs"):
        assert getattr(meta, field) == [r[field] for r in rows], field
    assert meta.banned_token_ids == [r["banned"] for r in rows]
    assert meta.banned_token_ids[4] == [42, 0]  # before min_tokens: stop ids and EOS
    assert meta.prompt_token_ids == [g.seq.prompt_token_ids for g in groups
                                     for _ in range(g.num_rows)]
    assert meta.output_token_ids[5:8] == [[100, 101], [100, 101, 7], [100, 101, 7, 8]]  # drafts


def test_plain_decode_rows_carry_no_bans_or_histories():
    groups = [SampleGroup(_seq(SamplingParams(temperature=0.0)), i, 1) for i in range(4)]
    meta = build_sampling_metadata(groups)
    assert meta.all_greedy and meta.step_ids == [2] * 4
    assert meta.banned_token_ids is None and meta.prompt_token_ids is None
