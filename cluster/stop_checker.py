"""When a sequence ends: EOS, stop token ids, stop strings, max_tokens, the context limit."""
from __future__ import annotations

from raylm.cluster.detokenizer import IncrementalDetokenizer
from raylm.cluster.request import Sequence


def ending_token_ids(seq: Sequence) -> list[int]:
    """The token ids that end ``seq`` once it has min_tokens outputs (check's id rules): its
    stop_token_ids, and its EOS ids unless ignore_eos."""
    p = seq.request.params
    ids = list(p.stop_token_ids or [])
    if not p.ignore_eos:
        ids.extend(seq.request.eos_token_ids)
    return ids


class StopChecker:
    def __init__(self, tokenizer, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len

    def attach(self, seq: Sequence) -> None:
        p = seq.request.params
        seq.detokenizer = IncrementalDetokenizer(
            self.tokenizer, seq.prompt_token_ids, skip_special_tokens=p.skip_special_tokens,
            stop=p.stop or None, include_stop_str_in_output=p.include_stop_str_in_output,
            min_tokens=p.min_tokens)

    def check(self, seq: Sequence, token: int) -> tuple[str, int | str | None] | None:
        """Feed the new token; returns (finish_reason, stop_reason) when the sequence ends."""
        p = seq.request.params
        num_out = seq.num_output_tokens
        finish = None
        # A token that ends the sequence by id keeps its id but adds no text (OpenAI semantics).
        if num_out >= p.min_tokens:
            if not p.ignore_eos and token in seq.request.eos_token_ids:
                finish = ("stop", None)
            elif p.stop_token_ids and token in p.stop_token_ids:
                finish = ("stop", token)
        if finish is None:
            _, stop_str = seq.detokenizer.append([token])
            if stop_str is not None:
                return ("stop", stop_str)  # the detokenizer already cut the text
            if num_out >= p.max_tokens or seq.num_tokens >= self.max_model_len:
                finish = ("length", None)
        if finish is not None:
            seq.detokenizer.flush()
        return finish
