"""`raylm bench structured --libraries`: token-mask cost of the candidate grammar libraries.

Each library compiles the same JSON schemas for the model's tokenizer; a batch of matchers (one
per sequence, schemas round-robin) then walks random valid paths: per step the whole batch's
bitmask is filled (the library's batched / parallel call where it has one), one allowed token
is drawn per row and every matcher advances. Reported per library: compile time per schema,
mask time per step for the batch, advance time per step, and whether every finished output
validates against its schema (`jsonschema`). This is how raylm chose its grammar library
(notes in /work/notes/10-structured.md); the losers are optional imports here only.
"""
from __future__ import annotations

import json
import random
import time
from typing import Any

import numpy as np

# Bounded schemas: a random walk through the grammar must end (enums, maxLength, maxItems,
# integer ranges), as a random model's output must.
SCHEMAS: list[dict[str, Any]] = [
    {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "member": {"type": "boolean"}},
     "required": ["name", "age", "member"], "additionalProperties": False},
    {"type": "object", "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3}},
     "required": ["color", "tags"], "additionalProperties": False},
    {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 9999},
        "point": {"type": "object", "properties": {
            "x": {"type": "integer", "minimum": -50, "maximum": 50},
            "y": {"type": "integer", "minimum": -50, "maximum": 50}},
            "required": ["x", "y"], "additionalProperties": False},
        "kind": {"anyOf": [{"const": "a"}, {"const": "b"}, {"type": "null"}]}},
     "required": ["id", "point", "kind"], "additionalProperties": False},
    {"type": "object", "properties": {
        "items": {"type": "array", "maxItems": 4, "items": {
            "type": "object", "properties": {
                "sku": {"type": "string", "maxLength": 8},
                "qty": {"type": "integer", "minimum": 1, "maximum": 99}},
            "required": ["sku", "qty"], "additionalProperties": False}},
        "note": {"type": "string", "maxLength": 20}},
     "required": ["items"], "additionalProperties": False},
]


def _bitmask(batch: int, vocab: int) -> np.ndarray:
    return np.zeros((batch, (vocab + 31) // 32), dtype=np.int32)  # [batch, ceil(vocab / 32)]


def allowed_ids(row: np.ndarray, vocab: int) -> np.ndarray:
    """Token ids whose bit is set in one bitmask row (bit j of word w = token 32 w + j)."""
    bits = np.unpackbits(row.view(np.uint8), bitorder="little")[:vocab]
    return np.flatnonzero(bits)


class _Xgrammar:
    name = "xgrammar"

    def __init__(self, tokenizer, vocab: int, eos: list[int], threads: int) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab,
                                                  stop_token_ids=eos)
        self.compiler = xgr.GrammarCompiler(info, max_threads=threads, cache_enabled=False)
        self.batch = xgr.BatchGrammarMatcher(max_threads=threads)

    def compile(self, schema: dict) -> Any:
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matchers: list, bitmask: np.ndarray) -> None:
        import torch

        self.batch.batch_fill_next_token_bitmask(matchers, torch.from_numpy(bitmask))

    def accept(self, m: Any, token: int) -> bool:
        return m.accept_token(token)

    def done(self, m: Any) -> bool:
        return m.is_terminated()


class _Llguidance:
    name = "llguidance"

    def __init__(self, tokenizer, vocab: int, eos: list[int], threads: int) -> None:
        import llguidance
        import llguidance.hf

        self.ll = llguidance
        self.tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab, eos_token=eos[0])
        self.executor = llguidance.LLExecutor(num_threads=threads)

    def compile(self, schema: dict) -> Any:
        grammar = self.ll.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False})
        return grammar

    def matcher(self, compiled: Any) -> Any:
        m = self.ll.LLMatcher(self.tok, compiled)
        assert not m.is_error(), m.get_error()
        return m

    def fill(self, matchers: list, bitmask: np.ndarray) -> None:
        self.executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)],
                                              bitmask.ctypes.data, bitmask.shape[1] * 4,
                                              bitmask.shape[0])

    def accept(self, m: Any, token: int) -> bool:
        return m.consume_token(token)

    def done(self, m: Any) -> bool:
        return m.is_stopped()


class _OutlinesCore:
    """No batched call: one `write_mask_into` per row. The vocabulary is built from the
    byte-level BPE pieces (outlines-core wants each token's bytes)."""

    name = "outlines-core"

    def __init__(self, tokenizer, vocab: int, eos: list[int], threads: int) -> None:
        from outlines_core import Vocabulary
        decode = {c: b for b, c in _bytes_to_unicode().items()}
        special = set(tokenizer.all_special_ids)
        pieces: dict[bytes, list[int]] = {}
        for piece, tid in tokenizer.get_vocab().items():
            if tid in special or tid in eos:
                continue
            try:
                key = bytes(decode[c] for c in piece)
            except KeyError:
                continue
            pieces.setdefault(key, []).append(tid)
        self.vocabulary = Vocabulary(eos[0], pieces)
        self.vocab = vocab

    def compile(self, schema: dict) -> Any:
        from outlines_core import Index
        from outlines_core.json_schema import build_regex_from_schema

        regex = build_regex_from_schema(json.dumps(schema), whitespace_pattern="")
        return Index(regex, self.vocabulary)

    def matcher(self, compiled: Any) -> Any:
        from outlines_core import Guide

        return Guide(compiled)

    def fill(self, matchers: list, bitmask: np.ndarray) -> None:
        row_bytes = bitmask.shape[1] * 4
        bitmask.fill(0)  # write_mask_into only sets bits
        for i, g in enumerate(matchers):
            g.write_mask_into(bitmask.ctypes.data + i * row_bytes, bitmask.shape[1], 4)

    def accept(self, m: Any, token: int) -> bool:
        if m.is_finished() and token == self.vocabulary.get_eos_token_id():
            return True  # a final state's EOS has no transition
        m.advance(token)
        return True

    def done(self, m: Any) -> bool:
        return m.is_finished()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level BPE alphabet: byte -> the printable character standing for it."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


LIBRARIES = {"xgrammar": _Xgrammar, "llguidance": _Llguidance, "outlines-core": _OutlinesCore}


def measure_library(name: str, tokenizer, vocab: int, eos: list[int], batch: int,
                    num_steps: int, threads: int, seed: int = 0,
                    verbose: bool = False) -> dict[str, Any]:
    """`num_steps` steps at a steady `batch`: a row that ends is validated and restarts."""
    import jsonschema

    lib = LIBRARIES[name](tokenizer, vocab, eos, threads)
    t0 = time.perf_counter()
    compiled = [lib.compile(s) for s in SCHEMAS]
    for c in compiled:  # llguidance compiles lazily, in its first matcher
        lib.matcher(c)
    compile_ms = (time.perf_counter() - t0) * 1e3 / len(SCHEMAS)
    matchers = [lib.matcher(compiled[i % len(SCHEMAS)]) for i in range(batch)]
    rng = random.Random(seed)
    outputs: list[list[int]] = [[] for _ in range(batch)]
    mask_s = accept_s = 0.0
    num_finished = num_valid = 0
    bitmask = _bitmask(batch, vocab)
    eos_set = set(eos)
    for _ in range(num_steps):
        t0 = time.perf_counter()
        lib.fill(matchers, bitmask)
        mask_s += time.perf_counter() - t0
        chosen = []
        for i in range(batch):
            ids = allowed_ids(bitmask[i], vocab)
            # End as soon as the grammar allows it half the time: keeps the walks short.
            ends = [t for t in ids if t in eos_set]
            chosen.append(ends[0] if ends and rng.random() < 0.5 else int(rng.choice(ids)))
        t0 = time.perf_counter()
        for m, token in zip(matchers, chosen):
            assert lib.accept(m, token), (name, token)
        accept_s += time.perf_counter() - t0
        for i, token in enumerate(chosen):
            if token not in eos_set:
                outputs[i].append(token)
                continue
            num_finished += 1
            try:
                jsonschema.validate(json.loads(tokenizer.decode(outputs[i])),
                                    SCHEMAS[i % len(SCHEMAS)])
                num_valid += 1
            except (ValueError, jsonschema.ValidationError) as exc:
                if verbose:
                    print(name, repr(tokenizer.decode(outputs[i])), str(exc)[:200])
            outputs[i] = []
            matchers[i] = lib.matcher(compiled[i % len(SCHEMAS)])
    return {"library": name, "batch": batch, "steps": num_steps,
            "compile_ms_per_schema": compile_ms,
            "mask_ms_per_step": mask_s * 1e3 / num_steps,
            "advance_ms_per_step": accept_s * 1e3 / num_steps,
            "finished": num_finished, "valid": num_valid}
