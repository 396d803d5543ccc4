"""Grammar matchers on the engine side: one per structured sequence, one bitmask per step.

The matchers live with the sequences (the scheduler's process), not on the workers: a step's
allowed tokens travel to the driver rank inside `SamplingMetadata` as a packed bitmask, so the
Ray / tensor-parallel executors need nothing new, and a matcher never has to follow a sequence
across processes. llguidance fills the whole batch's bitmask in one call on its own thread
pool (the GIL released); the sampler applies it to the logits with tensor ops.

Lifecycle: `new_matcher` when the request is made (a bad grammar fails the request with a
ValueError naming the field), `fork` with the sequence (n > 1), `advance` with every accepted
token; the sequence ends with EOS, which the mask allows only where the grammar may end.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Any

import numpy as np

from raylm.cluster.structured_outputs import StructuredOutputsParams

logger = logging.getLogger(__name__)

GRAMMAR_CACHE_SIZE = 256  # compiled grammars kept (one template matcher per distinct spec)


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


class GrammarMatchers:
    """The engine's grammar state: the tokenizer as llguidance sees it, the compile cache and
    the thread pool that fills masks."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: frozenset[int],
                 num_threads: int | None = None) -> None:
        import llguidance
        import llguidance.hf

        self._ll = llguidance
        eos = sorted(eos_token_ids) or [tokenizer.eos_token_id]
        # The model's vocabulary may be larger than the tokenizer's (padding rows): those ids
        # are never allowed.
        try:
            self.tokenizer = llguidance.hf.from_tokenizer(
                tokenizer, n_vocab=vocab_size, eos_token=eos if len(eos) > 1 else eos[0])
        except ValueError as exc:  # llguidance reads fast (Rust) tokenizers only
            raise ValueError(f"structured_outputs: not available for this model's tokenizer "
                             f"({exc})") from None
        self.vocab_size = vocab_size
        self.executor = llguidance.LLExecutor(num_threads=num_threads)
        self._templates: OrderedDict[str, Any] = OrderedDict()
        self.num_compiled = 0
        self.mask_seconds = 0.0  # time spent filling bitmasks (benchmarks report it)

    def new_matcher(self, spec: StructuredOutputsParams) -> Any:
        """A fresh matcher at the grammar's start. Raises ValueError naming the field."""
        key = spec.cache_key
        template = self._templates.get(key)
        if template is None:
            template = self._ll.LLMatcher(self.tokenizer, spec.to_grammar(), log_level=0)
            if template.is_error():
                raise ValueError(f"structured_outputs.{spec.kind}: {template.get_error()}")
            self.num_compiled += 1
            self._templates[key] = template
            if len(self._templates) > GRAMMAR_CACHE_SIZE:
                self._templates.popitem(last=False)
        else:
            self._templates.move_to_end(key)
        return template.deep_copy()

    @staticmethod
    def fork(matcher: Any) -> Any:
        return matcher.deep_copy()

    @staticmethod
    def advance(matcher: Any, token: int) -> bool:
        """Accept a sampled token; returns True when the grammar is complete (only EOS could
        follow). Raises if the token was not allowed (a bug: the mask forbids it)."""
        if not matcher.consume_token(token):
            raise RuntimeError(f"the grammar matcher rejected token {token}: "
                               f"{matcher.get_error()}")
        return matcher.is_stopped()

    def fill_bitmask(self, matchers: list[Any]) -> np.ndarray:  # [len(matchers), words] int32
        """Allowed tokens of each matcher, bit t % 32 of word t // 32 (all matchers at once)."""
        bitmask = np.zeros((len(matchers), bitmask_words(self.vocab_size)), dtype=np.int32)
        if matchers:
            self.executor.unsafe_compute_mask_ptr(
                [(m, i) for i, m in enumerate(matchers)], bitmask.ctypes.data,
                bitmask.shape[1] * 4, bitmask.shape[0])
        return bitmask

    def get_stats(self) -> dict[str, float]:
        return {"num_grammars_compiled": self.num_compiled,
                "grammar_mask_seconds": self.mask_seconds}

    def step_bitmask(self, groups: list[Any]) -> tuple[list[int], np.ndarray] | None:
        """The step's grammar rows (into the sampled logits) and their bitmask, from the
        input builder's sample groups; None when no scheduled sequence has a grammar. The n
        first-step rows of an n > 1 request share one matcher, so it is filled once."""
        rows: list[int] = []
        matchers: list[Any] = []
        row_matcher: list[int] = []
        for g in groups:
            if g.seq.grammar is None:
                continue
            assert not g.spec_token_ids, "structured sequences are never speculated"
            matchers.append(g.seq.grammar)
            rows.extend(range(g.first_row, g.first_row + g.num_rows))
            row_matcher.extend([len(matchers) - 1] * g.num_rows)
        if not rows:
            return None
        t0 = time.perf_counter()
        bitmask = self.fill_bitmask(matchers)
        self.mask_seconds += time.perf_counter() - t0
        if len(row_matcher) != len(matchers):
            bitmask = bitmask[row_matcher]
        return rows, bitmask
