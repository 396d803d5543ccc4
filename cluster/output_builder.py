"""RequestOutput snapshots: cumulative state plus the delta since the previous snapshot."""
from __future__ import annotations

from raylm.cluster.outputs import CompletionOutput, RequestMetrics, RequestOutput
from raylm.cluster.request import Request


def make_request_output(request: Request, final: bool) -> RequestOutput:
    completions = []
    # A negative index marks a decoder's working sequence (live beams, contrastive candidates).
    for seq in sorted((s for s in request.seqs if s.index >= 0), key=lambda s: s.index):
        text = seq.detokenizer.output_text if seq.detokenizer is not None else ""
        tokens = seq.output_token_ids
        want_logprobs = request.params.logprobs is not None
        completions.append(CompletionOutput(
            index=seq.index,
            text=text,
            token_ids=tokens,
            # A beam's score is its meaning, so beam search always reports it.
            cumulative_logprob=(seq.cumulative_logprob
                                if want_logprobs or request.params.num_beams > 1 else None),
            logprobs=list(seq.output_logprobs) if want_logprobs else None,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            delta_text=text[seq.num_emitted_chars:],
            delta_token_ids=tokens[seq.num_emitted_tokens:],
            delta_logprobs=seq.output_logprobs[seq.num_emitted_tokens:] if want_logprobs else None,
        ))
        seq.num_emitted_chars = len(text)
        seq.num_emitted_tokens = len(tokens)
    metrics = RequestMetrics(
        arrival_time=request.arrival_time,
        first_scheduled_time=request.first_scheduled_time,
        first_token_time=request.first_token_time,
        finished_time=request.finished_time,
        num_preemptions=request.num_preemptions,
    )
    return RequestOutput(
        request_id=request.request_id,
        prompt=request.prompt,
        prompt_token_ids=request.prompt_token_ids,
        outputs=completions,
        finished=final and request.is_finished,
        prompt_logprobs=request.prompt_logprobs,
        num_cached_tokens=max((s.num_cached_tokens for s in request.seqs), default=0),
        metrics=metrics,
    )
