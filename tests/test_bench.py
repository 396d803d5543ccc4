"""`raylm bench throughput|latency` on a tiny model: they run, and write sane JSON and a chart.

No timing is asserted (the machine may be shared); only that the figures exist and make sense.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from raylm.cluster.bench import latency, report, roofline, throughput
from raylm.cluster.bench.latency import TokenTimes
from raylm.cluster.bench.hf_baseline import generate_batch, load_hf_model
from raylm.cluster.bench.workload import BenchRequest, load_model_info, make_requests

KV_CACHE_BYTES = str(32 << 20)  # a small pool: the tiny model needs little and it allocates fast


@pytest.fixture(scope="module")
def model_dir(tiny_model) -> str:
    return str(tiny_model("llama"))


def _parse(module, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


def test_throughput_command_writes_results_for_raylm_and_hf(model_dir, tmp_path, capsys):
    out = tmp_path / "throughput.json"
    args = _parse(throughput, [
        "--model", model_dir, "--num-prompts", "6", "--prompt-len", "16", "--output-len", "6",
        "--baseline", "hf", "--hf-batch-sizes", "2,4", "--kv-cache-memory", KV_CACHE_BYTES,
        "--out", str(out),
    ])
    assert throughput.run(args) == 0

    data = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    assert set(data["results"]) == {"raylm", "hf"}
    for result in data["results"].values():
        assert result["num_requests"] == 6
        assert result["output_tokens"] == data["workload"]["output_tokens"]
        assert result["prompt_tokens"] == data["workload"]["prompt_tokens"]
        assert result["output_tokens_per_s"] > 0
        assert result["total_tokens_per_s"] > result["output_tokens_per_s"]
        assert 0 < result["fraction_of_compute_roofline"] < 1.5
    assert data["output_throughput_ratio"] > 0
    assert data["hf"]["batch_size"] in (2, 4)
    assert data["roofline"]["matmul_flops"] > 0
    assert data["params"]["non_embedding"] > 0
    printed = capsys.readouterr().out
    assert "raylm / hf output tokens/s" in printed and "useful FLOPs" in printed


def test_throughput_without_baseline_reports_raylm_only(model_dir, tmp_path):
    out = tmp_path / "raylm_only.json"
    args = _parse(throughput, [
        "--model", model_dir, "--num-prompts", "3", "--prompt-len", "8", "--output-len", "4",
        "--baseline", "none", "--kv-cache-memory", KV_CACHE_BYTES, "--out", str(out), "--no-png",
    ])
    assert throughput.run(args) == 0
    data = json.loads(out.read_text())
    assert set(data["results"]) == {"raylm"}
    assert data["output_throughput_ratio"] is None
    assert not out.with_suffix(".png").exists()


def test_throughput_of_a_mixed_decoding_batch(model_dir, tmp_path):
    out = tmp_path / "mixed.json"
    args = _parse(throughput, [
        "--model", model_dir, "--num-prompts", "8", "--prompt-len", "8", "--output-len", "4",
        "--baseline", "none", "--decoding", "mixed", "--kv-cache-memory", KV_CACHE_BYTES,
        "--out", str(out), "--no-png",
    ])
    assert throughput.run(args) == 0  # every kind returned exactly its output length
    data = json.loads(out.read_text())
    assert data["decoding"] == "mixed" and data["results"]["raylm"]["output_tokens_per_s"] > 0


def test_throughput_with_sampling_against_hf_sampling(model_dir, tmp_path):
    out = tmp_path / "sampling.json"
    args = _parse(throughput, [
        "--model", model_dir, "--num-prompts", "4", "--prompt-len", "8", "--output-len", "4",
        "--baseline", "hf", "--hf-batch-sizes", "4", "--decoding", "sampling",
        "--kv-cache-memory", KV_CACHE_BYTES, "--out", str(out), "--no-png",
    ])
    assert throughput.run(args) == 0  # every request, both sides, returned its output length
    data = json.loads(out.read_text())
    assert data["decoding"] == "sampling" and "do_sample" in data["hf"]["method"]
    assert data["results"]["raylm"]["output_tokens"] == data["results"]["hf"]["output_tokens"]
    assert data["output_throughput_ratio"] > 0


def test_latency_command_writes_decode_time_and_floor_fraction(model_dir, tmp_path, capsys):
    out = tmp_path / "latency.json"
    args = _parse(latency, [
        "--model", model_dir, "--prompt-len", "8", "--output-len", "6", "--num-iters", "1",
        "--baseline", "hf", "--kv-cache-memory", KV_CACHE_BYTES, "--out", str(out),
    ])
    assert latency.run(args) == 0

    data = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    assert data["roofline"]["floor_ms_per_token"] > 0
    assert set(data["results"]) == {"raylm", "hf"}
    for result in data["results"].values():
        assert result["ms_per_token"] > 0
        assert 0 < result["fraction_of_memory_floor"] < 1.5
        assert 0 < result["fraction_of_strictest_floor"] <= result["fraction_of_memory_floor"]
        assert len(result["floor_windows_s_per_token"]) == 2  # one run between two windows
    assert data["roofline"]["num_windows"] == 4
    assert data["decode_speed_ratio"] > 0
    assert "ms/token" in capsys.readouterr().out


def test_latency_times_multi_step_decode_against_one_step_per_call(model_dir, tmp_path, capsys):
    out = tmp_path / "latency.json"
    args = _parse(latency, [
        "--model", model_dir, "--prompt-len", "8", "--output-len", "12", "--num-iters", "1",
        "--baseline", "none", "--kv-cache-memory", KV_CACHE_BYTES, "--ab-decode-steps", "2",
        "--out", str(out), "--no-png",
    ])
    assert latency.run(args) == 0

    data = json.loads(out.read_text())
    assert data["results"]["raylm"]["model_steps_per_executor_call"] > 2  # runs of up to 8
    ab = data["decode_steps_ab"]
    assert ab["max_decode_steps"] == 8 and ab["pairs"] == 2 and 0 <= ab["faster_in"] <= 2
    assert ab["ms_per_token"] > 0 and ab["one_step_ms_per_token"] > 0
    assert ab["median_time_ratio"] > 0
    assert "decode steps per call" in capsys.readouterr().out


def test_latency_judges_each_run_against_the_windows_around_it():
    """A run's floor is the stricter of the bandwidth windows just before and after it, so a slow
    machine moment slows floor and decode alike instead of flattering or sinking the fraction."""
    runs = iter([TokenTimes(0.0, 1.0, 1.0 + 9 * 0.004), TokenTimes(0.0, 1.0, 1.0 + 9 * 0.008),
                 TokenTimes(0.0, 1.0, 1.0 + 9 * 0.004)])
    warmed = []
    windows = iter([0.003, 0.003, 0.006, 0.002])  # seconds per token at each window's bandwidth

    def generate():
        if not warmed:
            warmed.append(True)
            return TokenTimes(0.0, 1.0, 2.0)
        return next(runs)

    m = latency.measure_decode(generate, 10, 3, lambda: next(windows))
    assert m["floor_windows_s_per_token"] == [0.003, 0.003, 0.006, 0.002]
    assert m["run_fractions_of_floor"] == pytest.approx([0.75, 0.375, 0.5])
    assert m["fraction_of_memory_floor"] == pytest.approx(0.5)
    assert m["decode_s_per_token"] == pytest.approx(0.004)
    assert m["ttft_s"] == 1.0


def test_latency_rejects_a_single_output_token(model_dir):
    args = _parse(latency, ["--model", model_dir, "--output-len", "1"])
    with pytest.raises(ValueError, match="output_len"):
        latency.run(args)


def test_workload_is_reproducible_and_free_of_special_tokens(model_dir):
    info = load_model_info(model_dir)
    first = make_requests(info, 400, 40, 20, seed=7)
    assert first == make_requests(info, 400, 40, 20, seed=7)
    assert first != make_requests(info, 400, 40, 20, seed=8)

    from transformers import AutoTokenizer

    special = set(AutoTokenizer.from_pretrained(model_dir).all_special_ids)
    ids = np.concatenate([r.prompt_token_ids for r in first])
    assert not special & set(ids.tolist())
    assert set(ids.tolist()) <= set(info.allowed_token_ids.tolist())
    # Lognormal lengths: the requested means, a spread, and always inside the context window.
    assert np.mean([r.prompt_len for r in first]) == pytest.approx(40, rel=0.1)
    assert np.mean([r.output_len for r in first]) == pytest.approx(20, rel=0.1)
    assert len({r.prompt_len for r in first}) > 10
    assert all(r.prompt_len + r.output_len <= info.max_model_len for r in first)


def test_workload_fixed_lengths_and_input_validation(model_dir):
    info = load_model_info(model_dir)
    requests = make_requests(info, 5, 12, 3, fixed_lengths=True)
    assert [(r.prompt_len, r.output_len) for r in requests] == [(12, 3)] * 5
    with pytest.raises(ValueError, match="num_prompts"):
        make_requests(info, 0, 12, 3)
    with pytest.raises(ValueError, match="prompt_len"):
        make_requests(info, 1, info.max_model_len, 3)


def test_hf_batch_returns_exactly_each_requests_own_output_length(model_dir):
    model = load_hf_model(model_dir, "float32", "cpu")
    info = load_model_info(model_dir)
    prompts = make_requests(info, 3, 10, 5, seed=1)
    batch = [BenchRequest(p.prompt_token_ids, n) for p, n in zip(prompts, (2, 7, 4))]
    outputs = generate_batch(model, batch, "cpu")
    assert [len(o) for o in outputs] == [2, 7, 4]


def test_param_counts_split_the_model_by_role(model_dir):
    counts = roofline.count_params(model_dir)
    assert counts.embedding > 0 and counts.lm_head > 0 and counts.body > 0
    assert counts.non_embedding == counts.body + counts.lm_head
    tied = counts.total == counts.embedding + counts.body
    assert tied or counts.total == counts.embedding + counts.body + counts.lm_head
    # FLOPs: the body runs on every token, the LM head only on sampled (output) tokens.
    assert counts.useful_flops(10, 0) == 2 * counts.body * 10
    assert counts.useful_flops(0, 1) == 2 * (counts.body + counts.lm_head)
    assert counts.decode_weight_bytes("bfloat16") * 2 == counts.decode_weight_bytes("float32")


def test_roofline_measures_positive_hardware_figures():
    assert roofline.matmul_flops("cpu", "float32") > 0
    assert roofline.memory_bandwidth("cpu", num_bytes=16 << 20) > 0
    with pytest.raises(ValueError, match="dtype"):
        roofline.resolve_dtype("int3")


def test_every_roofline_window_is_measured(monkeypatch):
    """The benches take the better of a window before and one after their runs, so a second
    call must measure again, not return the first window's figure."""
    timed = []
    monkeypatch.setattr(roofline, "_best_seconds",
                        lambda fn, device, repeats: timed.append(fn) or 1e-3)
    roofline.matmul_flops("cpu", "float32")
    roofline.memory_bandwidth("cpu", num_bytes=1 << 20)
    first = len(timed)
    roofline.matmul_flops("cpu", "float32")
    roofline.memory_bandwidth("cpu", num_bytes=1 << 20)
    assert first > 0 and len(timed) == 2 * first


def test_format_table_aligns_columns_and_checks_row_width():
    text = report.format_table(("system", "tok/s"), [("raylm", 1234.5678), ("hf", 12.0)])
    lines = text.splitlines()
    assert len({len(line) for line in lines}) == 1
    assert "1235" in text
    with pytest.raises(ValueError):
        report.format_table(("a", "b"), [("only one",)])


def test_router_bench_workloads_share_prefixes_only_when_asked():
    import argparse

    from raylm.cluster.bench.serve_routers import workload_prompts
    from raylm.cluster.serve.prefix_hash import request_prefix_digests

    args = argparse.Namespace(workload="shared-prefix", num_prefixes=3, prefix_len=60,
                              input_len=5, num_requests=30, seed=0)
    shared = workload_prompts(args, salt="s")
    assert len(shared) == 30 and len({p.split("\n")[0] for p in shared}) == 3
    firsts = {request_prefix_digests({"prompt": p})[0] for p in shared}
    assert len(firsts) == 3  # requests group by system prompt, as the router sees them
    args.workload = "random"
    unique = workload_prompts(args, salt="s")
    assert len({request_prefix_digests({"prompt": p})[0] for p in unique}) == 30


def test_cpu_meter_tells_a_busy_client_from_an_idle_one():
    import time

    from raylm.cluster.bench.cpu_meter import CpuMeter

    meter = CpuMeter()
    time.sleep(0.3)
    idle = meter.stop()
    meter = CpuMeter()
    end = time.perf_counter() + 0.3
    while time.perf_counter() < end:  # one thread spinning: about one core
        pass
    busy = meter.stop()
    assert idle.process_cores < 0.2
    assert busy.process_cores > 0.5
    assert busy.machine_busy_cores is not None and busy.machine_busy_cores >= 0.5
    assert busy.machine_busy_cores <= busy.num_cpus + 0.01
    assert set(busy.to_dict()) == {"process_cores", "machine_busy_cores", "num_cpus"}


def test_pooled_ratio_interval_covers_the_ratio_and_narrows_with_steadier_rounds():
    """The interval `raylm bench serve` prints next to a served/engine throughput ratio: it holds
    the pooled ratio, is the same for the same rounds, shrinks when the rounds agree, and a
    machine drift that slows both setups of a round alike does not widen it (rounds are
    resampled whole)."""
    rng = np.random.default_rng(0)
    noisy = [(100 * f, 1.0, 100.0, 1.0) for f in rng.normal(0.97, 0.05, 12)]
    steady = [(100 * f, 1.0, 100.0, 1.0) for f in rng.normal(0.97, 0.005, 12)]
    pooled = sum(r[0] for r in noisy) / sum(r[2] for r in noisy)
    lo, hi = report.pooled_ratio_interval(noisy)
    assert lo < pooled < hi
    assert report.pooled_ratio_interval(noisy) == (lo, hi)
    slo, shi = report.pooled_ratio_interval(steady)
    assert shi - slo < (hi - lo) / 4 and slo < 0.97 < shi
    # each round's machine speed drifts by up to 2x, the same for both setups of the round
    speeds = rng.uniform(0.5, 1.0, 12)
    drifted = [(a * s, 1.0, b * s, 1.0) for (a, _, b, _), s in zip(steady, speeds)]
    dlo, dhi = report.pooled_ratio_interval(drifted)
    assert dhi - dlo < (hi - lo) / 4
    assert report.pooled_ratio_interval(noisy[:2]) is None
    # a round whose baseline made no tokens (every request failed): no interval, no crash
    assert report.pooled_ratio_interval(noisy[:5] + [(50.0, 1.0, 0.0, 1.0)]) is None
