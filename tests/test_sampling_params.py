"""SamplingParams: invalid values raise ValueError naming the field; valid combinations construct."""
from __future__ import annotations

import pytest

from raylm.cluster.sampling_params import SamplingParams

INVALID = [
    ("temperature", dict(temperature=-0.1)),
    ("temperature", dict(temperature="hot")),
    ("top_p", dict(top_p=0.0)),
    ("top_p", dict(top_p=1.5)),
    ("top_k", dict(top_k=-2)),
    ("top_k", dict(top_k=2.5)),
    ("min_p", dict(min_p=-0.1)),
    ("min_p", dict(min_p=1.1)),
    ("repetition_penalty", dict(repetition_penalty=0.0)),
    ("repetition_penalty", dict(repetition_penalty=-1.0)),
    ("presence_penalty", dict(presence_penalty=2.5)),
    ("presence_penalty", dict(presence_penalty=-2.1)),
    ("frequency_penalty", dict(frequency_penalty=3.0)),
    ("frequency_penalty", dict(frequency_penalty=-2.5)),
    ("n", dict(n=0)),
    ("max_tokens", dict(max_tokens=0)),
    ("max_tokens", dict(max_tokens=None)),
    ("min_tokens", dict(min_tokens=-1)),
    ("min_tokens", dict(min_tokens=17, max_tokens=16)),
    ("logprobs", dict(logprobs=-1)),
    ("logprobs", dict(logprobs=21)),
    ("prompt_logprobs", dict(prompt_logprobs=-1)),
    ("stop", dict(stop=[1])),
    ("stop", dict(stop=5)),
    ("stop", dict(stop=[""])),
    ("stop_token_ids", dict(stop_token_ids=["a"])),
    ("stop_token_ids", dict(stop_token_ids=[1.5])),
    ("stop_token_ids", dict(stop_token_ids=3)),
    ("num_beams", dict(num_beams=0)),
    ("temperature", dict(num_beams=4, temperature=0.7)),
    ("top_p", dict(num_beams=4, temperature=0.0, top_p=0.9)),
    ("top_k", dict(num_beams=4, temperature=0.0, top_k=5)),
    ("n", dict(num_beams=2, temperature=0.0, n=3)),
    ("early_stopping", dict(num_beams=2, early_stopping="sometimes")),
    ("penalty_alpha", dict(penalty_alpha=-0.1, top_k=4)),
    ("penalty_alpha", dict(penalty_alpha=1.5, top_k=4)),
    ("top_k", dict(penalty_alpha=0.6, top_k=1)),
    ("top_k", dict(penalty_alpha=0.6)),
    ("penalty_alpha", dict(penalty_alpha=0.6, top_k=4, num_beams=2)),
    ("seed", dict(seed=1.5)),
    ("seed", dict(seed="42")),
    ("seed", dict(seed=True)),
    ("ignore_eos", dict(ignore_eos="yes")),
    # one request must not be able to exhaust a replica (issue 15)
    ("n", dict(n=2**32)),
    ("n", dict(n=10**7)),
    ("n", dict(n=100000)),
    ("n", dict(n=129)),
    ("n", dict(n=True)),
    ("n", dict(n="4")),
    ("max_tokens", dict(max_tokens="4")),
    ("max_tokens", dict(max_tokens=2**63)),
    ("num_beams", dict(num_beams=10**6)),
    ("top_k", dict(top_k=2**70)),
    ("top_k", dict(penalty_alpha=0.5, top_k=10**6)),
    ("seed", dict(seed=2**80)),
    ("stop", dict(stop=["x"] * 65)),
    ("stop", dict(stop=["x" * 1025])),
    ("stop_token_ids", dict(stop_token_ids=list(range(1025)))),
    ("stop_token_ids", dict(stop_token_ids=[2**63])),
    ("logprobs", dict(logprobs=True)),
    ("temperature", dict(temperature=10**400)),
] + [(name, {name: value}) for name in ("temperature", "top_p", "min_p", "repetition_penalty",
                                        "presence_penalty", "frequency_penalty",
                                        "length_penalty", "penalty_alpha")
     for value in (float("nan"), float("inf"), float("-inf"))]


@pytest.mark.parametrize("field,kwargs", INVALID, ids=[f"{f}-{k}" for f, k in INVALID])
def test_invalid_value_names_the_field(field: str, kwargs: dict) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(
    "kwargs,sampling_type",
    [
        (dict(), "random"),
        (dict(temperature=0), "greedy"),
        (dict(temperature=0.7, top_p=0.9, top_k=50, min_p=0.05, seed=-3), "random"),
        (dict(repetition_penalty=1.3, presence_penalty=-2, frequency_penalty=2.0), "random"),
        (dict(n=4, temperature=1.2, logprobs=20, prompt_logprobs=0), "random"),
        (dict(max_tokens=5, min_tokens=5, stop=["\n", "END"], stop_token_ids=[2, 7]), "random"),
        (dict(num_beams=4), "beam"),  # the default temperature means "not sampling"
        (dict(num_beams=4, n=4, temperature=0.0, length_penalty=0.5, early_stopping="never"), "beam"),
        (dict(num_beams=2, early_stopping=True), "beam"),
        (dict(penalty_alpha=0.6, top_k=4), "contrastive"),
        (dict(top_k=-1), "random"),
    ],
)
def test_valid_combinations_construct(kwargs: dict, sampling_type: str) -> None:
    params = SamplingParams(**kwargs)
    assert params.sampling_type == sampling_type
    assert params.is_greedy == (sampling_type == "greedy")


def test_normalisation() -> None:
    params = SamplingParams(stop="###", top_k=-1, stop_token_ids=[5, 5, 9], temperature=1)
    assert params.stop == ["###"]
    assert params.top_k == 0
    assert params.all_stop_token_ids == {5, 9}
    assert isinstance(params.temperature, float)
    default = SamplingParams()
    assert default.stop == [] and default.stop_token_ids == [] and default.all_stop_token_ids == set()


def test_round_trip_and_clone_are_independent() -> None:
    params = SamplingParams(
        n=2, temperature=0.5, stop=["a", "bc"], stop_token_ids=[3], seed=7, logprobs=2
    )
    data = params.to_dict()
    assert SamplingParams.from_dict(data) == params
    twin = params.clone()
    assert twin == params
    twin.stop.append("z")
    assert params.stop == ["a", "bc"]


def test_from_dict_rejects_unknown_field() -> None:
    with pytest.raises(ValueError, match="best_of"):
        SamplingParams.from_dict({"best_of": 2})



@pytest.mark.parametrize("search", [dict(num_beams=2, temperature=0.0),
                                    dict(penalty_alpha=0.6, top_k=4)])
@pytest.mark.parametrize("penalty", [dict(repetition_penalty=1.2), dict(presence_penalty=0.5),
                                     dict(frequency_penalty=0.5)])
def test_searches_reject_penalties_they_would_ignore(search, penalty):
    with pytest.raises(ValueError, match=next(iter(penalty))):
        SamplingParams(**search, **penalty)
