"""Prefix digests that the router and the replicas compute alike, and the replica's bounded index.

Why text, not the KV manager's block hashes: the KV manager keys blocks with Python's `hash()`
of (parent, token ids, salt) tuples, which differs between processes (`hash(None)` is an address
in Python 3.11, strings are salted per process), and matching them at the ingress would need the
tokenizer there (chat template included) for every request. Hashing the prompt *text* in fixed
chunks gives the same routing signal without it. Measured on this machine (2 cores, tiny llama
demo tokenizer; `python -m raylm.cluster.serve.prefix_hash`): digesting a 4,000-character prompt
costs about 50 us, tokenizing it about 2.5 ms (chat rendering more), so the router stays cheap on
the ingress's event loop.

A digest chains the previous one (like KV blocks do), so digest i identifies the whole prefix
`text[: (i + 1) * CHUNK_CHARS]`: two requests share digest i iff they share that prefix.
Only full chunks are hashed (KV caches only full blocks); at most MAX_CHUNKS per request.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any, Iterable

CHUNK_CHARS = 128  # ~32 tokens of English text: two 16-token KV blocks
CHUNK_TOKENS = 16  # prompt_token_ids requests: one KV block per chunk
MAX_CHUNKS = 256  # the router hashes at most the first 32k characters of a prompt
# a chunk of prompt text stands for about this many tokens, to size the index to the KV pool
CHARS_PER_TOKEN = 4


def _chain(pieces: Iterable[bytes]) -> list[int]:
    digests = []
    parent = b""
    for piece in pieces:
        parent = hashlib.blake2b(parent + piece, digest_size=8).digest()
        digests.append(int.from_bytes(parent, "little", signed=True))
    return digests


def _prompt_text(request: dict[str, Any]) -> str | None:
    if isinstance(request.get("prompt"), str):
        return request["prompt"]
    messages = request.get("messages")
    if isinstance(messages, list):
        # a later chat turn repeats the earlier messages: it extends this text (stickiness)
        parts = []
        for m in messages:
            if isinstance(m, dict):
                parts.append(f"{m.get('role', '')}\x1f{m.get('content', '')}\x1e")
        return "".join(parts)
    return None


def request_prefix_digests(request: Any) -> list[int]:
    """Chained digests of the request's full prompt chunks (empty for anything unroutable)."""
    if not isinstance(request, dict):
        return []
    ids = request.get("prompt_token_ids")
    if isinstance(ids, list):
        num = min(len(ids) // CHUNK_TOKENS, MAX_CHUNKS)
        return _chain(b"t" + ",".join(str(t) for t in ids[i * CHUNK_TOKENS:(i + 1) * CHUNK_TOKENS])
                      .encode() for i in range(num))
    text = _prompt_text(request)
    if not text:
        return []
    data = text.encode("utf-8", "surrogatepass")
    num = min(len(data) // CHUNK_CHARS, MAX_CHUNKS)
    # salt requests use separate KV entries: keep their digests apart too
    salt = str(request.get("cache_salt") or "").encode()
    return _chain(salt + data[i * CHUNK_CHARS:(i + 1) * CHUNK_CHARS] for i in range(num))


def index_capacity(num_kv_blocks: int, block_size: int, max_entries: int) -> int:
    """How many digests a replica keeps: about the prompt text its KV pool can hold, so the
    index forgets prefixes at roughly the pace the LRU block pool evicts them."""
    chunks = num_kv_blocks * block_size * CHARS_PER_TOKEN // CHUNK_CHARS
    return max(1, min(max_entries, chunks))


class PrefixIndex:
    """The digests of prefixes a replica served recently, least recently used first out."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._digests: OrderedDict[int, None] = OrderedDict()

    def add(self, digests: list[int]) -> None:
        for d in digests:
            self._digests[d] = None
            self._digests.move_to_end(d)
        while len(self._digests) > self.capacity:
            self._digests.popitem(last=False)

    def snapshot(self) -> list[int]:
        return list(self._digests)

    def __len__(self) -> int:
        return len(self._digests)


def _measure() -> None:
    """Print the per-request cost of digesting vs tokenizing (the figure in the docstring)."""
    import time

    from raylm.workers.make_model import demo_model_dir
    from transformers import AutoTokenizer

    text = ("You are a helpful assistant. Answer briefly and cite sources. " * 64)[:4000]
    tok = AutoTokenizer.from_pretrained(str(demo_model_dir()))
    for name, fn in (("digest", lambda: request_prefix_digests({"prompt": text})),
                     ("tokenize", lambda: tok(text)["input_ids"])):
        fn()
        start = time.perf_counter()
        for _ in range(200):
            fn()
        print(f"{name}: {(time.perf_counter() - start) / 200 * 1e6:.0f} us per 4,000-char prompt")


if __name__ == "__main__":
    _measure()
