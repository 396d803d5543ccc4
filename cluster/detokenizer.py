"""Incremental detokenization with stop strings (pure Python, no torch).

Decoding the whole output every step costs O(length) per token; decoding only the new token is
wrong for byte-level BPE, where one character can span several tokens, and for tokenizers whose
pieces render differently depending on their left neighbour. So each step decodes a small window
`ids[prefix_offset:]` and emits what it adds beyond `ids[prefix_offset:read_offset]` (text
already emitted). While the window ends in an incomplete character (decoded as U+FFFD) nothing is
emitted and the offsets stay, so the window grows until the character is whole.

Stop strings are matched on the text, so they are found across token boundaries. Text that could
still turn out to be the start of a stop string (the longest suffix of the text that is a proper
prefix of some stop string) is held back until it is resolved, so a stream never shows stop text.
"""
from __future__ import annotations

import copy

from typing import Any, Protocol

# Prompt tokens decoded as left context of the first output token (enough for a leading-space
# rule or a character split across the prompt/output boundary).
_NUM_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class Tokenizer(Protocol):
    """What is needed of a tokenizer: HF `PreTrainedTokenizerFast` and `tokenizers.Tokenizer` fit."""

    def decode(self, ids: Any, skip_special_tokens: bool = ...) -> str: ...


def fast_decode(tokenizer: Any):
    """`tokenizer.decode`, or the Rust tokenizer's own decode where that is what the HF fast
    tokenizer would do anyway: two decodes per generated token, and the HF wrapper's argument
    handling costs several times the decode itself on short windows."""
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return tokenizer.decode
    if not isinstance(tokenizer, TokenizersBackend) or \
            type(tokenizer)._decode is not TokenizersBackend._decode:
        return tokenizer.decode
    backend = tokenizer.backend_tokenizer
    cleans_up = tokenizer.clean_up_tokenization_spaces and not (
        type(backend.model).__name__ == "BPE" and not getattr(
            tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output",
            False))
    return tokenizer.decode if cleans_up else backend.decode


class IncrementalDetokenizer:
    """Turns one sequence's generated token ids into text, step by step.

    Feed every generated token to `append` except a token that ends the sequence by id (EOS or a
    `stop_token_ids` hit): as in the OpenAI API, its text is not part of the output. After a stop
    string is hit the sequence is finished: further `append` calls are a caller bug. As with
    EOS, a stop string completed before `min_tokens` output tokens does not end the output.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: list[int],
        *,
        skip_special_tokens: bool = True,
        stop: list[str] | None = None,
        include_stop_str_in_output: bool = False,
        min_tokens: int = 0,
    ) -> None:
        self._decode_ids = fast_decode(tokenizer)
        self._skip_special_tokens = skip_special_tokens
        self._stop = [s for s in (stop or []) if s]
        self._include_stop = include_stop_str_in_output
        self._min_tokens = min_tokens  # stop strings end the output only from this many tokens on
        context = list(prompt_token_ids[-_NUM_CONTEXT_TOKENS:])
        # A prompt ending inside a character must not glue onto the output's first bytes: the
        # output's text is then what decoding the output alone gives.
        while context and self._decode(context).endswith(_REPLACEMENT_CHAR):
            context.pop()
        self._ids: list[int] = context  # left context + output tokens
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._text = ""  # all decoded output text (before truncation at a stop string)
        self.output_text = ""  # emitted so far
        self.num_output_tokens = 0  # tokens consumed; on a stop string, the one completing it is last
        self.stop_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.stop_reason is not None

    def append(self, token_ids: list[int]) -> tuple[str, str | None]:
        """Add generated tokens; returns (text safe to emit now, the stop string hit or None).

        Tokens are consumed one by one and consumption ends at the token that completes a stop
        string: `num_output_tokens` then says how many of all the tokens the output keeps.
        """
        assert not self.finished, "append after a stop string was hit"
        start = len(self.output_text)
        for token_id in token_ids:
            self.num_output_tokens += 1
            checked_upto = len(self._text)
            self._ids.append(token_id)
            self._text += self._decode_step()
            can_stop = self.num_output_tokens >= self._min_tokens
            if self._stop and can_stop and self._find_stop(checked_upto):
                break
        if not self.finished:
            emit_upto = max(len(self.output_text), len(self._text) - self._held_back_len())
            self.output_text = self._text[:emit_upto]
        return self.output_text[start:], self.stop_reason

    def flush(self) -> str:
        """On a finish that is not a stop string (EOS, stop token, length): the held-back text."""
        if self.finished:
            return ""
        # A trailing incomplete character cannot complete any more: emit it as decode() would.
        if self._read_offset < len(self._ids):
            prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
            full_text = self._decode(self._ids[self._prefix_offset :])
            self._text += full_text[len(prefix_text) :]
            self._prefix_offset = self._read_offset = len(self._ids)
        start = len(self.output_text)
        self.output_text = self._text
        return self.output_text[start:]

    def clone(self) -> "IncrementalDetokenizer":
        """An independent copy with the same state (a forked sequence continues from here)."""
        other = copy.copy(self)
        other._ids = list(self._ids)
        other._stop = list(self._stop)
        return other

    # --- internals --------------------------------------------------------------------------

    def _decode(self, ids: list[int]) -> str:
        return self._decode_ids(ids, skip_special_tokens=self._skip_special_tokens)

    def _decode_step(self) -> str:
        """New text from the token just appended, or "" while a character is incomplete."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset :])
        if len(full_text) <= len(prefix_text) or full_text.endswith(_REPLACEMENT_CHAR):
            return ""  # a skipped special token, or a character still split across tokens
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return full_text[len(prefix_text) :]

    def _find_stop(self, checked_upto: int) -> bool:
        """Look for the earliest stop string that ends in the text added after `checked_upto`."""
        best: tuple[int, str] | None = None
        for stop in self._stop:
            index = self._text.find(stop, max(0, checked_upto - len(stop) + 1))
            if index >= 0 and (best is None or index < best[0]):
                best = (index, stop)
        if best is None:
            return False
        index, stop = best
        end = index + len(stop) if self._include_stop else index
        # Held-back text guarantees nothing past the match start was emitted.
        assert len(self.output_text) <= index, (self.output_text, index)
        self.output_text = self._text[:end]
        self._text = self._text[: index + len(stop)]
        self.stop_reason = stop
        return True

    def _held_back_len(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop string."""
        held = 0
        for stop in self._stop:
            for k in range(min(len(stop) - 1, len(self._text)), held, -1):
                if self._text.endswith(stop[:k]):
                    held = k
                    break
        return held
