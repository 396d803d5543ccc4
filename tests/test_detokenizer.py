"""IncrementalDetokenizer: streamed text equals a full decode; stop strings never leak."""
from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from raylm.cluster.detokenizer import IncrementalDetokenizer

EOS = "<|endoftext|>"
CORPUS = [
    "héllo wörld 日本語 🙂",
    "the quick brown fox jumps over the lazy dog",
    "héllo again, wörld! 日本語を話します 🙂🙂",
    "stop here STOP there, and END the story.",
    "naïve café façade — über straße ½ ∑ 👩‍💻",
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """A byte-level BPE with few merges, so multi-byte characters span several tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 10, trainer=trainer)
    return tok


def encode(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text).ids


def stream(
    detok: IncrementalDetokenizer, ids: list[int], chunk: int = 1
) -> tuple[list[str], str | None]:
    deltas: list[str] = []
    for start in range(0, len(ids), chunk):
        delta, stop = detok.append(ids[start : start + chunk])
        deltas.append(delta)
        if stop is not None:
            return deltas, stop
    deltas.append(detok.flush())
    return deltas, None


def test_multibyte_characters_span_several_tokens(tokenizer: Tokenizer) -> None:
    # Guards the premise of the other tests: some token alone decodes to a partial character.
    ids = encode(tokenizer, "日本語 🙂")
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)


@pytest.mark.parametrize("text", CORPUS)
@pytest.mark.parametrize("chunk", [1, 3])
def test_concatenated_deltas_equal_full_decode(tokenizer: Tokenizer, text: str, chunk: int) -> None:
    prompt = encode(tokenizer, "prompt: 日本")
    ids = encode(tokenizer, text)
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas, stop = stream(detok, ids, chunk)
    assert stop is None
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert detok.output_text == text
    assert all("\ufffd" not in d for d in deltas)


def test_random_token_sequences_match_decode(tokenizer: Tokenizer) -> None:
    rng = random.Random(0)
    vocab = tokenizer.get_vocab_size()
    for _ in range(50):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
        prompt = [rng.randrange(vocab) for _ in range(rng.randrange(0, 8))]
        detok = IncrementalDetokenizer(tokenizer, prompt)
        deltas, _ = stream(detok, ids)
        assert "".join(deltas) == tokenizer.decode(ids)


def test_special_tokens_skipped_or_kept(tokenizer: Tokenizer) -> None:
    eos = tokenizer.token_to_id(EOS)
    ids = encode(tokenizer, "héllo") + [eos] + encode(tokenizer, " wörld")
    for skip in (True, False):
        detok = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=skip)
        deltas, _ = stream(detok, ids)
        assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=skip)
    assert EOS not in tokenizer.decode(ids, skip_special_tokens=True)


def test_stop_string_spanning_two_tokens(tokenizer: Tokenizer) -> None:
    text = "naïve café façade"
    ids = encode(tokenizer, text)
    stop = "café"
    # Premise: no single token holds the whole stop string.
    assert all(stop not in tokenizer.decode([i]) for i in ids)
    detok = IncrementalDetokenizer(tokenizer, [], stop=[stop])
    deltas, hit = stream(detok, ids)
    assert hit == stop
    assert "".join(deltas) == detok.output_text == "naïve "
    # The tokens after the one completing the stop string were not consumed.
    assert tokenizer.decode(ids[: detok.num_output_tokens]).endswith(stop)
    assert stop not in tokenizer.decode(ids[: detok.num_output_tokens - 1])


def test_stop_at_very_first_token(tokenizer: Tokenizer) -> None:
    ids = encode(tokenizer, "the quick brown fox")
    first = tokenizer.decode(ids[:1])
    detok = IncrementalDetokenizer(tokenizer, encode(tokenizer, "hi"), stop=[first])
    delta, hit = detok.append(ids)
    assert (delta, hit) == ("", first)
    assert detok.output_text == ""
    assert detok.num_output_tokens == 1


def test_include_stop_str_in_output(tokenizer: Tokenizer) -> None:
    ids = encode(tokenizer, "stop here STOP there, and END the story.")
    detok = IncrementalDetokenizer(tokenizer, [], stop=["END", "STOP"], include_stop_str_in_output=True)
    deltas, hit = stream(detok, ids)
    assert hit == "STOP"  # the earliest match wins
    assert "".join(deltas) == detok.output_text == "stop here STOP"


@pytest.mark.parametrize("text", CORPUS)
def test_streaming_never_leaks_stop_text(tokenizer: Tokenizer, text: str) -> None:
    # Every substring of length 2..6 of the text as a stop string: no streamed prefix may contain
    # any part of the match, and the final output ends right before it.
    ids = encode(tokenizer, text)
    for start in range(0, len(text) - 2, 3):
        for length in (2, 4, 6):
            stop = text[start : start + length]
            if len(stop) < 2:
                continue
            detok = IncrementalDetokenizer(tokenizer, [], stop=[stop])
            streamed = ""
            hit = None
            for i in ids:
                delta, hit = detok.append([i])
                streamed += delta
                assert streamed == text[: len(streamed)]
                assert len(streamed) <= text.index(stop)
                if hit is not None:
                    break
            assert hit == stop
            assert streamed == text[: text.index(stop)]


def test_held_back_text_is_released(tokenizer: Tokenizer) -> None:
    # "Sto" could start "Stop!"; once the text moves on it is emitted, and flush releases the rest.
    detok = IncrementalDetokenizer(tokenizer, [], stop=["Stop!"])
    streamed = ""
    for i in encode(tokenizer, "Stop here. Sto"):
        delta, hit = detok.append([i])
        assert hit is None
        streamed += delta
    assert streamed == "Stop here. "
    assert detok.flush() == "Sto"
    assert detok.output_text == "Stop here. Sto"


def test_transformers_tokenizer_wrapper(tokenizer: Tokenizer) -> None:
    from transformers import PreTrainedTokenizerFast

    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS)
    text = "héllo again, wörld! 日本語を話します 🙂🙂"
    ids = hf_tok.encode(text, add_special_tokens=False)
    prompt = hf_tok.encode("prompt", add_special_tokens=False)
    detok = IncrementalDetokenizer(hf_tok, prompt, stop=["🙂🙂"])
    deltas, hit = stream(detok, ids)
    assert hit == "🙂🙂"
    assert "".join(deltas) == "héllo again, wörld! 日本語を話します "


def test_each_step_decodes_a_small_window(tokenizer: Tokenizer) -> None:
    # Streaming a long output must not re-decode everything each step (quadratic cost).
    class CountingTokenizer:
        max_window = 0

        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            CountingTokenizer.max_window = max(CountingTokenizer.max_window, len(ids))
            return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    text = " ".join(CORPUS) * 20
    ids = encode(tokenizer, text)
    detok = IncrementalDetokenizer(CountingTokenizer(), encode(tokenizer, "a long prompt " * 50))
    deltas, _ = stream(detok, ids)
    assert "".join(deltas) == text
    assert len(ids) > 1000
    assert CountingTokenizer.max_window <= 16


def test_stop_string_ignored_before_min_tokens(tokenizer: Tokenizer) -> None:
    text = "stop here STOP there, and END the story."
    ids = encode(tokenizer, text)
    detok = IncrementalDetokenizer(tokenizer, [], stop=["here"], min_tokens=len(ids) // 2)
    deltas, hit = stream(detok, ids)
    assert hit is None
    assert "".join(deltas) == text
    # A match completed at or after min_tokens still stops.
    detok = IncrementalDetokenizer(tokenizer, [], stop=["END"], min_tokens=3)
    deltas, hit = stream(detok, ids)
    assert hit == "END" and "".join(deltas) == "stop here STOP there, and "


def test_fast_decode_equals_the_hf_tokenizer_decode(tokenizer: Tokenizer, tmp_path) -> None:
    """The detokenizer decodes with the Rust tokenizer directly where the HF wrapper would do
    the same; the text must not change (special tokens skipped or kept, split characters)."""
    from transformers import PreTrainedTokenizerFast

    from raylm.cluster.detokenizer import fast_decode

    for clean_up in (False, True):  # True: ignored for a BPE model, as HF does
        hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS,
                                     clean_up_tokenization_spaces=clean_up)
        decode = fast_decode(hf)
        assert decode == hf.backend_tokenizer.decode
        rng = random.Random(clean_up)
        for _ in range(200):
            ids = [rng.randrange(tokenizer.get_vocab_size()) for _ in range(rng.randrange(1, 9))]
            for skip in (True, False):
                assert decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    wordpiece = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]")),
                                        clean_up_tokenization_spaces=True)
    assert fast_decode(wordpiece) == wordpiece.decode  # its cleanup is real: keep HF's path
