"""Prompt-lookup proposals: the continuation of the latest earlier occurrence of the longest
matching suffix, at most k tokens, nothing when nothing matches."""
import pytest

from raylm.workers.ngram_proposer import NgramProposer


def test_proposes_what_followed_the_longest_suffix():
    p = NgramProposer(prompt_lookup_max=3, prompt_lookup_min=1)
    #            the suffix [7, 8, 9] occurred at 1..3, followed by 10, 11, 12
    tokens = [5, 7, 8, 9, 10, 11, 12, 6, 7, 8, 9]
    assert p.propose(tokens, 2) == [10, 11]
    assert p.propose(tokens, 10) == [10, 11, 12, 6, 7, 8, 9]


def test_the_latest_occurrence_wins_and_shorter_suffixes_are_tried():
    p = NgramProposer(prompt_lookup_max=2, prompt_lookup_min=1)
    assert p.propose([1, 2, 1, 3, 4, 1], 1) == [3]  # [4, 1] never seen; [1] latest at 2 -> 3
    assert p.propose([1, 2, 3], 4) == []  # no earlier occurrence of any suffix
    assert p.propose([1, 2, 1], 0) == []


def test_bad_settings_name_the_field():
    with pytest.raises(ValueError, match="prompt_lookup_min"):
        NgramProposer(prompt_lookup_max=2, prompt_lookup_min=3)
