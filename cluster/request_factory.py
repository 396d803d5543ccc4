"""Request intake: a prompt and SamplingParams become a validated Request.

Everything checked here depends on the model (vocabulary, context, EOS ids, grammar compiling)
or on this engine's limits (max_num_seqs); SamplingParams checks what it can alone. Runs on the
caller's thread (AsyncEngine: the event loop), never in the step loop.
"""
from __future__ import annotations

from raylm.cluster.decoding import make_decoder
from raylm.cluster.grammar_matcher import GrammarMatchers
from raylm.cluster.request import Request
from raylm.cluster.sampling_params import SamplingParams


class RequestFactory:
    def __init__(self, tokenizer, model_path: str, vocab_size: int, max_model_len: int,
                 max_num_seqs: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.eos_token_ids = _eos_token_ids(tokenizer, model_path)
        self.grammars: GrammarMatchers | None = None  # built by the first structured request

    def make(self, prompt: str | list[int], params: SamplingParams | None, request_id: str,
             priority: int = 0, max_tokens_must_fit: bool = False,
             prompt_text: str | None = None) -> Request:
        """Tokenize and validate; raises ValueError naming the field. Does not enqueue.
        `max_tokens_must_fit`: refuse a max_tokens the context cannot hold after the prompt
        (the servers' default) instead of ending at the context with finish_reason "length".
        `prompt_text`: the text of token-id `prompt` when the caller tokenized it itself."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        if isinstance(prompt, str):
            text, token_ids = prompt, self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)):
            text, token_ids = prompt_text, list(prompt)
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in token_ids):
                raise ValueError("prompt_token_ids must be a list of ints")
            bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt_token_ids: {bad[0]} is outside the vocabulary "
                                 f"[0, {self.vocab_size})")
        else:
            raise ValueError(f"prompt must be a str or a list of token ids, got {type(prompt).__name__}")
        if not token_ids:
            raise ValueError("prompt is empty")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(token_ids)} tokens; the model's context "
                             f"(max_model_len) is {self.max_model_len}, leaving no room to generate")
        if max_tokens_must_fit and len(token_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"max_tokens: the prompt has {len(token_ids)} tokens and max_tokens "
                             f"is {params.max_tokens}, more than the model's context of "
                             f"{self.max_model_len} tokens; ask for at most "
                             f"{self.max_model_len - len(token_ids)}")
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ValueError(f"priority must be an int, got {priority!r}")
        self._check_fits(params)
        request = Request(request_id, text, token_ids, params, priority=priority,
                          eos_token_ids=self.eos_token_ids)
        request.decoder = make_decoder(request)
        if params.structured_outputs is not None:
            if self.grammars is None:
                self.grammars = GrammarMatchers(self.tokenizer, self.vocab_size, self.eos_token_ids)
            request.seqs[0].grammar = self.grammars.new_matcher(params.structured_outputs)
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = [None]
            request.cache_salt = request_id  # cached positions would have no logits
        return request

    def _check_fits(self, params: SamplingParams) -> None:
        """What SamplingParams cannot know: the vocabulary and this engine's batch size."""
        bad = [t for t in params.stop_token_ids if t >= self.vocab_size]
        if bad:
            # the sampler masks these ids while min_tokens is not reached
            raise ValueError(f"stop_token_ids: {bad[0]} is outside the vocabulary "
                             f"[0, {self.vocab_size})")
        max_seqs = self.max_num_seqs
        sizes = {"n": params.n, "num_beams": params.num_beams}
        if params.sampling_type == "contrastive":
            sizes["top_k"] = params.top_k  # one forked candidate sequence per top-k token
        for name, value in sizes.items():
            if value > max_seqs:
                # all of a request's sequences run in the same steps
                raise ValueError(f"{name} must be <= max_num_seqs ({max_seqs}) of this server, "
                                 f"got {value}")


def _eos_token_ids(tokenizer, model_path) -> frozenset[int]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    try:
        from transformers import GenerationConfig

        gen = GenerationConfig.from_pretrained(model_path)
        eos = gen.eos_token_id
        ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    except OSError:
        pass
    return frozenset(ids)
