"""Autoscaling on LLM signals, end to end on CPU: 1 -> 2 replicas (half a core each) while
requests wait, back to 1 when idle, and every request sent is answered in full, including the
streams in flight on the replica removed by the scale-down."""
from __future__ import annotations

import threading

import pytest

pytest.importorskip("ray")
requests = pytest.importorskip("requests")
from ray import serve  # noqa: E402

from tests.serve_builders import APP, serve_session, wait_until  # noqa: E402

MAX_TOKENS = 48


@pytest.fixture(scope="module")
def server(tiny_model):
    # one sequence per step: concurrent requests wait, which is the signal under test
    # (ongoing requests alone would never scale: their target is set out of reach)
    with serve_session(str(tiny_model("llama")), min_replicas=1, max_replicas=2,
                       num_cpus_per_rank=0.5, max_num_seqs=1, target_ongoing_requests=1000,
                       target_waiting_requests=1.0, ttft_p90_target_s=0, upscale_delay_s=1.0,
                       downscale_delay_s=4.0, autoscaling_metrics_interval_s=0.5,
                       autoscaling_look_back_period_s=2.0) as s:
        yield s


def _num_running_replicas() -> int:
    status = serve.status().applications[APP].deployments["LLMServer"]
    return sum(n for state, n in status.replica_states.items() if str(state).endswith("RUNNING"))


class _Load:
    """`num_clients` threads sending completions back to back until stopped."""

    def __init__(self, http: str, model: str, num_clients: int) -> None:
        self.sent = self.answered = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client, args=(http, model, i), daemon=True)
                         for i in range(num_clients)]
        for t in self._threads:
            t.start()

    def _client(self, http: str, model: str, index: int) -> None:
        n = 0
        while not self._stop.is_set():
            with self._lock:
                self.sent += 1
            n += 1
            try:
                r = requests.post(http + "/v1/completions", timeout=120, json={
                    "model": model, "prompt": f"client {index} request {n}", "temperature": 0,
                    "max_tokens": MAX_TOKENS, "ignore_eos": True})
                ok = r.status_code == 200 and r.json()["usage"]["completion_tokens"] == MAX_TOKENS
                detail = r.text[:200]
            except Exception as exc:  # reported below: the test asserts every request answered
                ok, detail = False, repr(exc)
            with self._lock:
                if ok:
                    self.answered += 1
                else:
                    self.failures.append(detail)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=150)


def test_scales_up_on_waiting_requests_and_down_when_idle_losing_nothing(server):
    assert _num_running_replicas() == 1
    load = _Load(server["http"], server["model"], num_clients=6)
    try:
        scaled_up = wait_until(lambda: _num_running_replicas() == 2, timeout_s=150, interval_s=1)
    finally:
        load.stop()
    assert scaled_up, "a second replica never started under load"
    # one client keeps streaming while the deployment is idle enough to shrink: the replica
    # removed finishes what it holds before it goes
    trickle = _Load(server["http"], server["model"], num_clients=1)
    try:
        scaled_down = wait_until(lambda: _num_running_replicas() == 1, timeout_s=90, interval_s=1)
    finally:
        trickle.stop()
    assert scaled_down, "the idle deployment never went back to one replica"
    sent, answered = load.sent + trickle.sent, load.answered + trickle.answered
    assert (sent, load.failures + trickle.failures) == (answered, [])
