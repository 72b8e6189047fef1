"""Timing engines that answer the same inputs, in interleaved blocks, for `fedstill bench` and `fedstill export`.

An engine is a callable taking a batch of model inputs (numpy). Every call is timed alone (perf_counter); the
engines take turns in `rounds` interleaved blocks, so a busy machine slows all of them alike. Latency is per
call, p50 and p95; throughput is the batch size over the median call (samples/s), which a shared machine's
stalls do not swamp; the mean over all calls (total samples / total time) is kept beside it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

Engine = Callable[[np.ndarray], Any]
Times = dict[str, dict[int, list[float]]]  # engine -> batch size -> seconds of each timed call
Table = dict[str, dict[str, dict[str, float]]]  # engine -> batch size (as text, JSON's keys) -> figure -> value


def torch_engine(model: torch.nn.Module) -> Engine:
    def call(x: np.ndarray) -> Any:
        with torch.inference_mode():
            return model(torch.from_numpy(x))
    return call


def measure(engines: dict[str, Engine], inputs: np.ndarray, batches: tuple[int, ...], iterations: int, warmup: int,
            rounds: int) -> Times:
    """Per engine and batch size, the seconds of each timed call, in interleaved blocks."""
    times: Times = {name: {b: [] for b in batches} for name in engines}
    for engine in engines.values():
        for b in batches:
            for _ in range(warmup):
                engine(inputs[:b])
    per_block = max(1, iterations // rounds)
    for _ in range(rounds):
        for name, engine in engines.items():
            for b in batches:
                x = inputs[:b]
                for _ in range(per_block):
                    started = time.perf_counter()
                    engine(x)
                    times[name][b].append(time.perf_counter() - started)
    return times


def figures(times: Times, reference: str) -> Table:
    """Throughput (samples/s at the median call, and over all calls), p50/p95 latency (ms), and ratios to the
    `reference` engine (`throughput_x_teacher`, `p50_vs_teacher`: the reference is the teacher in PyTorch)."""
    table: Table = {}
    for name, by_batch in times.items():
        table[name] = {}
        for b, seconds in by_batch.items():
            s = np.asarray(seconds)
            p50 = float(np.percentile(s, 50))
            table[name][str(b)] = {"throughput": b / p50, "throughput_mean": b * len(s) / float(s.sum()),
                                   "p50_ms": 1e3 * p50, "p95_ms": 1e3 * float(np.percentile(s, 95)), "calls": len(s)}
    for name in table:
        for batch, row in table[name].items():
            ref = table[reference][batch]
            row["throughput_x_teacher"] = row["throughput"] / ref["throughput"]
            row["p50_vs_teacher"] = row["p50_ms"] / ref["p50_ms"]
    return table
