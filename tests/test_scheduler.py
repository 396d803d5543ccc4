"""Scheduler: token budget, chunked prefill, preemption by recompute, priorities."""
from core_builders import fake_step, make_request, make_scheduler


def test_decodes_and_prefills_share_the_budget():
    sched = make_scheduler(max_num_batched_tokens=10)
    r1, r2 = make_request(6), make_request(8)
    sched.add(r1.seqs[0]); sched.add(r2.seqs[0])
    out = fake_step(sched)
    # r1 fully (6) + the first 4 tokens of r2's prompt (chunked prefill).
    assert [(s.seq.request is r1, s.num_new_tokens) for s in out.scheduled] == [(True, 6), (False, 4)]
    assert out.scheduled[0].samples and not out.scheduled[1].samples
    out = fake_step(sched)
    # r1 decodes 1 token; r2 finishes its prompt (4) and samples.
    assert [s.num_new_tokens for s in out.scheduled] == [1, 4]
    assert all(s.samples for s in out.scheduled)


def test_everything_finishes_and_frees_all_blocks():
    sched = make_scheduler(num_blocks=32, max_num_batched_tokens=16)
    reqs = [make_request(n, max_tokens=5) for n in (1, 3, 4, 5, 17, 30)]
    for r in reqs:
        sched.add(r.seqs[0])
    for _ in range(100):
        if not sched.num_unfinished:
            break
        fake_step(sched)
    assert sched.num_unfinished == 0
    assert all(r.seqs[0].num_output_tokens == 5 for r in reqs)
    assert sched.kv.num_free_blocks == 32


def test_preemption_when_blocks_run_out_then_recompute():
    # 6 blocks of 4 tokens: two sequences of 8-token prompts growing by 8 tokens cannot both fit.
    sched = make_scheduler(num_blocks=6, block_size=4, max_num_batched_tokens=64, prefix=False)
    reqs = [make_request(8, max_tokens=8), make_request(8, max_tokens=8, first_token=50)]
    for r in reqs:
        sched.add(r.seqs[0])
    for _ in range(200):
        if not sched.num_unfinished:
            break
        fake_step(sched)
    assert sched.num_unfinished == 0
    assert sched.num_preemptions > 0
    # The newest request was the victim, and it still completed all its tokens.
    assert reqs[1].num_preemptions > 0 and reqs[0].num_preemptions == 0
    assert all(r.seqs[0].num_output_tokens == 8 for r in reqs)
    assert sched.kv.num_free_blocks == 6


def test_priority_policy_serves_lower_value_first():
    sched = make_scheduler(max_num_seqs=1, policy="priority")
    low, high = make_request(4, priority=5), make_request(4, priority=0)
    sched.add(low.seqs[0]); sched.add(high.seqs[0])
    out = fake_step(sched)
    assert [s.seq.request for s in out.scheduled] == [high]


def test_fcfs_ignores_priority():
    sched = make_scheduler(max_num_seqs=1, policy="fcfs")
    first, second = make_request(4, priority=5), make_request(4, priority=0)
    sched.add(first.seqs[0]); sched.add(second.seqs[0])
    out = fake_step(sched)
    assert [s.seq.request for s in out.scheduled] == [first]


def test_max_num_seqs_caps_the_batch():
    sched = make_scheduler(max_num_seqs=2)
    for _ in range(4):
        sched.add(make_request(2).seqs[0])
    out = fake_step(sched)
    assert len(out.scheduled) == 2 and len(sched.waiting) == 2


def test_prefix_cache_hit_skips_computed_tokens():
    sched = make_scheduler(num_blocks=32, block_size=4, max_num_batched_tokens=64)
    a = make_request(13, max_tokens=1)
    sched.add(a.seqs[0])
    fake_step(sched)
    b = make_request(13, max_tokens=1)  # same prompt tokens
    sched.add(b.seqs[0])
    out = fake_step(sched)
    assert out.scheduled[0].num_new_tokens == 1  # 12 tokens (3 blocks) came from the cache
    assert b.seqs[0].num_cached_tokens == 12
