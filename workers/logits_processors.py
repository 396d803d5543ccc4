"""Batched logits processors: penalties, temperature, top-k / top-p / min-p.

Each function takes per-row parameters as tensors, so one call serves a batch where every row has
its own settings; none loops over tokens or the vocabulary in Python. Semantics follow Hugging Face
`transformers.generation.logits_process` (repetition penalty, temperature, top-k, top-p, min-p)
and the OpenAI API (presence / frequency penalties). The sampler, beam search and contrastive
search share them.
"""
from __future__ import annotations

import torch

from raylm.kernels.logit_filters import mask_below_cpu, top_k_filter_cpu, top_p_filter_cpu

_NEG_INF = float("-inf")


def compute_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax over the vocabulary, in float32.  [num_rows, vocab] -> [num_rows, vocab]"""
    return torch.log_softmax(logits.float(), dim=-1)


def pad_token_ids(
    token_ids: list[list[int]], pad_id: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Host token histories -> int64 `[num_rows, max_len]` (>= 1 column), padded with `pad_id`."""
    max_len = max((len(row) for row in token_ids), default=0)
    max_len = max(max_len, 1)
    padded = [row + [pad_id] * (max_len - len(row)) for row in token_ids]
    return torch.tensor(padded, dtype=torch.int64, device=device)


def apply_penalties(
    logits: torch.Tensor,  # [num_rows, vocab]
    prompt_token_ids: torch.Tensor,  # [num_rows, max_prompt_len] int64, padded with vocab
    output_token_ids: torch.Tensor,  # [num_rows, max_output_len] int64, padded with vocab
    repetition_penalty: torch.Tensor,  # [num_rows] float32, 1.0 = off
    presence_penalty: torch.Tensor,  # [num_rows] float32, 0.0 = off
    frequency_penalty: torch.Tensor,  # [num_rows] float32, 0.0 = off
) -> torch.Tensor:
    """Repetition penalty (HF), then presence / frequency penalties (OpenAI). Returns a new tensor.

    Repetition: for every token seen in the prompt or the output, a positive logit is divided by
    the penalty and a negative one multiplied by it. Presence / frequency: over output tokens,
    `logit -= presence * (count > 0) + frequency * count`. Pad ids (== vocab) fall into an extra
    column that is dropped, so histories of different lengths share one padded tensor.
    """
    num_rows, vocab = logits.shape
    # Only the tokens in the histories change: gather them, penalize, scatter back (O(history)
    # instead of ten passes over [num_rows, vocab]: 100 ms for 200 rows of 32000 on CPU).
    # [num_rows, vocab + 1]: the last column absorbs padding.
    out = torch.cat([logits, logits.new_zeros(num_rows, 1)], dim=1)
    seen = torch.cat([prompt_token_ids, output_token_ids], dim=1)  # [num_rows, seen_len]
    rep = repetition_penalty.to(logits.dtype).unsqueeze(1)  # [num_rows, 1]
    values = out.gather(1, seen)  # duplicates gather (and write back) the same value
    out.scatter_(1, seen, torch.where(values < 0, values * rep, values / rep))

    counts = torch.zeros(num_rows, vocab + 1, dtype=logits.dtype, device=logits.device)
    counts.scatter_add_(1, output_token_ids, torch.ones_like(output_token_ids, dtype=logits.dtype))
    count = counts.gather(1, output_token_ids)  # [num_rows, max_output_len], each token's count
    values = out.gather(1, output_token_ids)
    values = values - frequency_penalty.to(logits.dtype).unsqueeze(1) * count
    values = values - presence_penalty.to(logits.dtype).unsqueeze(1) * (count > 0).to(logits.dtype)
    out.scatter_(1, output_token_ids, values)
    return out[:, :vocab]


def apply_temperature(
    logits: torch.Tensor,  # [num_rows, vocab]
    temperature: torch.Tensor,  # [num_rows] float32, > 0
) -> torch.Tensor:
    return logits / temperature.to(logits.dtype).unsqueeze(1)


def apply_top_k_top_p_min_p(
    logits: torch.Tensor,  # [num_rows, vocab]
    top_k: torch.Tensor | None = None,  # [num_rows] int64, <= 0 = off
    top_p: torch.Tensor | None = None,  # [num_rows] float64, 1.0 = off
    min_p: torch.Tensor | None = None,  # [num_rows] float32, 0.0 = off
    max_top_k: int | None = None,
) -> torch.Tensor:
    """Mask filtered tokens with -inf (HF order: top-k, then top-p, then min-p). Returns a new tensor.

    Pass None for a filter no row uses; that skips its work. On CPU fp32, top-p needs no sort
    (`_top_p_without_sort`); elsewhere one ascending sort serves both top-k and top-p. top-k
    keeps ties with the k-th logit (as HF's TopKLogitsWarper); top-p drops the lowest tokens
    whose cumulative probability is <= 1 - top_p and always keeps the best token; min-p drops
    tokens whose probability is below min_p times the best token's.
    `top_p` is float64 so that `1 - top_p` rounds exactly as HF's Python-float arithmetic.
    Without top-p, top-k uses a partial `topk` instead of a full sort; `max_top_k` (the largest k
    of the rows using top-k, known on the host) spares a device sync to find it.
    """
    vocab = logits.shape[1]
    if top_k is not None and top_p is None:
        logits = _apply_top_k_only(logits, top_k, max_top_k)
    elif top_p is not None and (filtered := _top_p_without_sort(logits, top_k, top_p,
                                                                 max_top_k)) is not None:
        logits = filtered
    elif top_p is not None:
        sorted_logits, sorted_ids = logits.sort(dim=-1)  # ascending, [num_rows, vocab]
        if top_k is not None:
            k = torch.where(top_k <= 0, torch.full_like(top_k, vocab), top_k).clamp(max=vocab)
            kth_logit = sorted_logits.gather(1, (vocab - k).unsqueeze(1))  # [num_rows, 1]
            sorted_logits = sorted_logits.masked_fill(sorted_logits < kth_logit, _NEG_INF)
        cum_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # [num_rows, vocab]
        drop_mass = (1.0 - top_p.double()).to(cum_probs.dtype).unsqueeze(1)  # [num_rows, 1]
        remove = cum_probs <= drop_mass
        remove[:, -1] = False
        sorted_logits = sorted_logits.masked_fill(remove, _NEG_INF)
        logits = torch.empty_like(logits).scatter_(1, sorted_ids, sorted_logits)
    if min_p is not None:
        probs = logits.softmax(dim=-1)  # [num_rows, vocab]
        threshold = min_p.to(probs.dtype) * probs.amax(dim=-1)  # [num_rows]
        masked = mask_below_cpu(probs, threshold, logits)
        logits = masked if masked is not None else logits.masked_fill(
            probs < threshold.unsqueeze(1), _NEG_INF)
    return logits


def _top_p_without_sort(logits, top_k, top_p, max_top_k) -> torch.Tensor | None:
    """CPU: top-k, then top-p by bisection over the logits' order (kernels/csrc/top_p_cpu.cpp),
    the same tokens as the sort below up to fp rounding at the cut and the order of tied logits;
    the sort took 250 ms over a [200, 32000] batch. None where the kernel does not apply (GPU,
    16-bit logits, no compiler)."""
    if logits.device.type != "cpu" or logits.dtype != torch.float32:
        return None
    if top_k is not None:
        logits = _apply_top_k_only(logits, top_k, max_top_k)
    return top_p_filter_cpu(logits, top_p)


def _apply_top_k_only(
    logits: torch.Tensor,  # [num_rows, vocab]
    top_k: torch.Tensor,  # [num_rows] int64, <= 0 = off
    max_top_k: int | None,
) -> torch.Tensor:
    """Tokens below each row's k-th largest logit at -inf (ties kept, as HF's TopKLogitsWarper);
    on CPU fp32 by bisection (kernels/csrc/logit_mask_cpu.cpp: 3 ms where `topk` + `masked_fill`
    took 16 ms over [200, 32000])."""
    if (filtered := top_k_filter_cpu(logits, top_k)) is not None:
        return filtered
    vocab = logits.shape[1]
    off = top_k <= 0
    k = torch.where(off, torch.ones_like(top_k), top_k).clamp(max=vocab)  # [num_rows]
    if max_top_k is None:
        max_top_k = int(k.max())
    max_top_k = min(max(max_top_k, 1), vocab)
    top_values = logits.topk(max_top_k, dim=-1).values  # [num_rows, max_top_k], descending
    kth_logit = top_values.gather(1, (k.clamp(max=max_top_k) - 1).unsqueeze(1))  # [num_rows, 1]
    kth_logit = kth_logit.masked_fill(off.unsqueeze(1), _NEG_INF)
    return logits.masked_fill(logits < kth_logit, _NEG_INF)


def mask_token_ids(
    logits: torch.Tensor,  # [num_rows, vocab]
    token_ids: list[list[int]],
) -> torch.Tensor:
    """Set each row's listed token ids to -inf (e.g. EOS before `min_tokens`). Returns a new tensor.

    Writes only the listed entries: a [rows, vocab] boolean mask and `masked_fill` took 15 ms
    over [200, 32000] on a 2-core CPU, the copy here 1 ms."""
    vocab = logits.shape[1]
    # Ids outside the vocabulary cannot be sampled anyway; indexing would fail on them.
    pairs = [(r, t) for r, row in enumerate(token_ids) for t in row if 0 <= t < vocab]
    out = logits.clone()
    if pairs:
        index = torch.tensor(pairs, dtype=torch.int64).to(logits.device, non_blocking=True)
        out[index[:, 0], index[:, 1]] = _NEG_INF
    return out


def apply_token_bitmask(
    logits: torch.Tensor,  # [num_rows, vocab]
    rows: list[int],
    bitmask: torch.Tensor,  # [len(rows), ceil(vocab / 32)] int32, on the host
) -> torch.Tensor:
    """Set every token a row's bitmask does not allow to -inf (structured output); rows not
    listed are untouched. Bit t % 32 of word t // 32 allows token t; ids past the bitmask are
    disallowed. Returns a new tensor.

    On the host numpy does it (table-driven unpackbits, a lookup and an add: several times
    faster than the tensor ops there); on an accelerator the packed words travel (32x smaller than a
    boolean mask) and are unpacked there."""
    num_rows, vocab = logits.shape
    words = bitmask.shape[1]
    if words * 32 < vocab:  # ids past the bitmask are never allowed
        bitmask = torch.nn.functional.pad(bitmask, (0, -(-vocab // 32) - words))
    every_row = len(rows) == num_rows and rows == list(range(num_rows))
    if logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.float64):
        import numpy as np

        bits = np.unpackbits(bitmask.contiguous().numpy().view(np.uint8), axis=1, count=vocab,
                             bitorder="little")  # [len(rows), vocab] uint8 of 0 / 1
        # 0 where allowed, -inf where not: a table lookup and an add (a masked copy is
        # several times slower).
        bias = np.take(np.array([-np.inf, 0.0], dtype=np.float32), bits)  # [len(rows), vocab]
        if every_row:
            return torch.from_numpy(np.add(logits.numpy(), bias))
        out = logits.clone()
        view = out.numpy()  # shares out's memory
        view[rows] = view[rows] + bias
        return out
    # Little-endian words: byte i of a row holds tokens 8 i .. 8 i + 7, lowest bit first.
    packed = bitmask.contiguous().view(torch.uint8).to(logits.device, non_blocking=True)
    shifts = torch.arange(8, dtype=torch.uint8, device=logits.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1  # [len(rows), 4 W, 8]
    allowed = bits.view(len(rows), -1)[:, :vocab].bool()  # [len(rows), vocab]
    if every_row:
        return logits.masked_fill(~allowed, _NEG_INF)
    index = torch.tensor(rows, dtype=torch.int64, device=logits.device)
    out = logits.clone()
    out[index] = logits[index].masked_fill(~allowed, _NEG_INF)
    return out
