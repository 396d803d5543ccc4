"""Prompt-lookup (n-gram) proposals for speculative decoding: no model needed.

If the last n tokens of a sequence occurred earlier in it (prompt or output), the tokens that
followed that occurrence are proposed as the next ones. Code edits, retrieval answers and
summaries copy long spans from their prompt, so these drafts are often accepted; when nothing
matches, nothing is proposed and the sequence decodes normally. Proposals are point masses (the
verifier treats q as one-hot on the proposal; see rejection_sampler.py), which keeps sampled
requests lossless too.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NgramProposer:
    prompt_lookup_max: int = 4  # longest suffix matched first
    prompt_lookup_min: int = 1
    # How far back a match is searched, in tokens: bounds the per-step cost on long contexts.
    max_search_tokens: int = 4096

    def __post_init__(self) -> None:
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError(f"prompt_lookup_min must be in [1, prompt_lookup_max "
                             f"({self.prompt_lookup_max})], got {self.prompt_lookup_min}")
        if self.max_search_tokens < 2:
            raise ValueError(f"max_search_tokens must be >= 2, got {self.max_search_tokens}")

    def propose(self, token_ids: list[int], k: int) -> list[int]:
        """Up to ``k`` tokens that followed the latest earlier occurrence of the longest suffix
        of ``token_ids`` (between prompt_lookup_min and prompt_lookup_max long)."""
        if k <= 0:
            return []
        window = token_ids[-self.max_search_tokens:]
        length = len(window)
        for n in range(min(self.prompt_lookup_max, length - 1), self.prompt_lookup_min - 1, -1):
            suffix = window[length - n:]
            first = suffix[0]
            # Latest occurrence first: recent context predicts the continuation best.
            for start in range(length - n - 1, -1, -1):
                if window[start] == first and window[start:start + n] == suffix:
                    follow = window[start + n:start + n + k]
                    if follow:
                        return follow
        return []
