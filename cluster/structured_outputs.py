"""Structured output: what a request's text must match (pure Python, no torch).

`StructuredOutputsParams` is the per-request spec (vLLM's names): exactly one of `json` (a JSON
schema, dict or string), `json_object` (any JSON object), `regex`, `choice` (one of the given
strings) or `grammar` (a Lark grammar, llguidance's dialect). It compiles to an llguidance
grammar; the engine turns that into a token matcher per sequence (grammar_matcher.py) and the
sampler masks every token the matcher disallows.

JSON is compact (no whitespace between tokens): a model cannot pad its output with endless
whitespace, and the output is what `json.dumps(..., separators=(",", ":"))` would write.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

KINDS = ("json", "json_object", "regex", "choice", "grammar")
MAX_SPEC_CHARS = 1 << 20  # a schema / regex / grammar larger than 1 MiB is refused
MAX_CHOICES = 4096
# JSON without insignificant whitespace (see the module docstring).
_JSON_OPTIONS = {"whitespace_flexible": False}


@dataclass
class StructuredOutputsParams:
    json: dict | str | None = None
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        set_kinds = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(set_kinds) != 1:
            raise ValueError(f"structured_outputs: set exactly one of {', '.join(KINDS)}, "
                             f"got {set_kinds or 'none'}")
        if isinstance(self.json, str):
            try:
                self.json = json.loads(self.json)
            except ValueError as exc:
                raise ValueError(f"structured_outputs.json: not valid JSON ({exc})") from None
            if self.json is None:
                raise ValueError("structured_outputs.json: a JSON schema must be an object")
        if self.json is not None and not isinstance(self.json, (dict, bool)):
            raise ValueError("structured_outputs.json: a JSON schema must be an object")
        if self.json_object not in (None, True):
            raise ValueError("structured_outputs.json_object must be true when set")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"structured_outputs.{name} must be a string")
        if self.choice is not None:
            if (not isinstance(self.choice, (list, tuple)) or not self.choice
                    or not all(isinstance(c, str) for c in self.choice)):
                raise ValueError("structured_outputs.choice must be a non-empty list of strings")
            if len(self.choice) > MAX_CHOICES:
                raise ValueError(f"structured_outputs.choice: at most {MAX_CHOICES} choices")
            self.choice = list(self.choice)
        if len(self.cache_key) > MAX_SPEC_CHARS:
            raise ValueError(f"structured_outputs.{self.kind}: larger than "
                             f"{MAX_SPEC_CHARS} characters")
        error = _validate(self.to_grammar())
        if error:
            raise ValueError(f"structured_outputs.{self.kind}: {error}")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    @property
    def cache_key(self) -> str:
        """Equal for specs that compile to the same grammar."""
        return json.dumps([self.kind, getattr(self, self.kind)], sort_keys=True)

    def to_grammar(self) -> str:
        """The llguidance grammar (its JSON / Lark text) of this spec."""
        from llguidance import LLMatcher

        if self.json is not None:
            return LLMatcher.grammar_from_json_schema(self.json, defaults=_JSON_OPTIONS)
        if self.json_object:
            return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=_JSON_OPTIONS)
        if self.regex is not None:
            return LLMatcher.grammar_from_regex(self.regex)
        if self.choice is not None:
            # Lark string literals use JSON's escapes.
            return LLMatcher.grammar_from_lark(
                "start: " + " | ".join(json.dumps(c) for c in self.choice))
        return LLMatcher.grammar_from_lark(self.grammar)

    @classmethod
    def coerce(cls, value: Any) -> StructuredOutputsParams | None:
        """None, an instance, or its dict form (how it crosses Ray and the HTTP extras)."""
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"structured_outputs must be an object with one of "
                             f"{', '.join(KINDS)}, got {type(value).__name__}")
        unknown = sorted(set(value) - set(KINDS))
        if unknown:
            raise ValueError(f"structured_outputs: unknown key {unknown[0]!r} (expected one of "
                             f"{', '.join(KINDS)})")
        return cls(**value)


def _validate(grammar: str) -> str:
    """'' when llguidance accepts the grammar, else its error (a bad regex, an unsupported
    schema keyword, ...)."""
    from llguidance import LLMatcher

    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    return messages[0] if is_error else ""
