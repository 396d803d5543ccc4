"""`raylm serve` run as a user runs it, for the tests: a subprocess whose output is read line by
line, stopped with a signal, checked with real clients, and the processes it leaves behind."""
from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start(args: list[str]) -> tuple[subprocess.Popen, queue.Queue]:
    proc = subprocess.Popen([sys.executable, "-m", "raylm.cluster.cli", "serve", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(l) for l in proc.stdout], daemon=True).start()
    return proc, lines


def wait_for(lines: queue.Queue, needle: str, timeout_s: float) -> list[str]:
    seen, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1.0)
        except queue.Empty:
            continue
        seen.append(line)
        if needle in line:
            return seen
    raise AssertionError(f"{needle!r} not printed within {timeout_s}s; output:\n{''.join(seen)}")


def stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def check_serving(model: str, http_port: int, grpc_port: int) -> None:
    import grpc
    import openai

    from raylm.proto import generation_pb2 as pb
    from raylm.proto import generation_pb2_grpc as pb_grpc

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="none")
    out = client.completions.create(model=model, prompt="Hello", max_tokens=4, temperature=0)
    assert out.usage.completion_tokens == 4
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        reply = pb_grpc.GenerationStub(channel).Generate(
            pb.GenerateRequest(prompt="Hello", sampling=pb.SamplingOptions(max_tokens=4, temperature=0)),
            metadata=(("application", "raylm"),))
    assert list(reply.choices[0].token_ids) and reply.choices[0].text == out.choices[0].text


def drain_output(lines: queue.Queue) -> list[str]:
    out = []
    while not lines.empty():
        out.append(lines.get())
    return out


def descendants(pid: int) -> list[int]:
    """Process ids under `pid` (from /proc), Ray's raylet, GCS and workers among them."""
    import os

    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        kids = [p for p, pp in parents.items() if pp == parent]
        found += kids
        frontier += kids
    return found


def wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    """The pids still running (not zombies) after `timeout_s`."""
    def alive(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.5)
    return [p for p in pids if alive(p)]


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""
