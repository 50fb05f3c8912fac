"""Shared helpers of the benchmark scripts (timing, Markdown tables, worker subprocesses)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

RESULT_TAG = "BENCH-RESULT "


def set_threads(threads: int) -> int:
    """``threads > 0``: ``torch.set_num_threads(threads)``; ``0``: keep torch's default. Returns the count in use."""
    if threads > 0:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def time_runs(fn, repeats: int) -> list[float]:
    """Wall-clock seconds (``time.perf_counter``) of ``repeats`` calls of ``fn`` (warm-up is the caller's job)."""
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def summary(times: list[float]) -> dict:
    return {"best": min(times), "median": statistics.median(times), "runs": len(times)}


def table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table; floats are pre-formatted by the caller."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def environment_line() -> str:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"torch {torch.__version__}, Python {platform.python_version()}, {os.cpu_count()} CPU cores "
        f"({platform.processor() or platform.machine()}), torch default threads {torch.get_num_threads()}, "
        f"load average {load}"
    )


def emit(result: dict) -> None:
    """Worker side: print one JSON result line the parent picks up."""
    print(RESULT_TAG + json.dumps(result), flush=True)


def run_worker(script: str, args: list[str], env: dict | None = None, timeout: float | None = None) -> dict:
    """Run ``script`` in a fresh interpreter with ``args`` and return the JSON it emitted.

    The worker's stderr passes through; a failed worker raises with its output.
    """
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    proc = subprocess.run(
        [sys.executable, script, *args], capture_output=True, text=True, env=full_env, timeout=timeout, check=False
    )
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    raise RuntimeError(
        f"worker {script} {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
