"""Small builders for pure-Python core tests: requests, a scheduler, a fake model step."""
from __future__ import annotations

import itertools

from raylm.cluster.config import SchedulerConfig
from raylm.cluster.kv_cache_manager import KVCacheManager
from raylm.cluster.request import Request
from raylm.cluster.sampling_params import SamplingParams
from raylm.cluster.scheduler import Scheduler

_ids = itertools.count()


def make_request(prompt_len: int, max_tokens: int = 4, priority: int = 0, arrival: float | None = None,
                 first_token: int = 1) -> Request:
    tokens = list(range(first_token, first_token + prompt_len))
    return Request(f"r{next(_ids)}", None, tokens, SamplingParams(max_tokens=max_tokens,
                   temperature=0.0), priority=priority,
                   arrival_time=arrival if arrival is not None else float(next(_ids)))


def make_scheduler(num_blocks: int = 64, block_size: int = 4, max_num_seqs: int = 8,
                   max_num_batched_tokens: int = 32, prefix: bool = True, policy: str = "fcfs",
                   chunked: bool = True) -> Scheduler:
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=prefix)
    cfg = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                          policy=policy, enable_chunked_prefill=chunked)
    return Scheduler(cfg, kv)


def fake_step(sched: Scheduler, next_token: int = 7):
    """Schedule, 'run' the model (every sampling sequence gets next_token), finish at max_tokens."""
    out = sched.schedule()
    for s in out.scheduled:
        sched.kv.cache_full_blocks(s.seq)
        if s.samples:
            s.seq.token_ids.append(next_token)
            if s.seq.num_output_tokens >= s.seq.request.params.max_tokens:
                sched.finish(s.seq, "length")
    sched.kv.check_integrity()
    return out
