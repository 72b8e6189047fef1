"""The server's peak memory while it aggregates one round, against the number of institutions.

Usage: .venv/bin/python scripts/bench_streaming.py [--nodes 10,100] [--samples 10000] [--classes 10] [--streamed-only]

Each measurement runs in a fresh process, since peak RSS (`ru_maxrss`) is a process's high-water mark. The process
makes the synthetic replies one at a time (float32 rows on the simplex, as `SoftLabelReply.from_record` hands them
to the server), folds each into the rule's running aggregate and lets it go, as the server's soft-label round does
(server/rounds.py `folding`), then takes the result. Ways measured:

    mean, streamed          the default rule: one (n, C) float64 running sum
    weighted, streamed      weight-clip 0: the same, weighted by each size
    median, rows held       a rule that needs every row (streaming.py `HeldRows`)
    mean, batch             the path before streaming: every reply's rows held, then `aggregate`

Prints the peak RSS of each process and its growth over the same process just before the first reply; no Flower is
imported (the ServerApp's Flower and torch add a constant on top).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from collections.abc import Callable, Iterator

import numpy as np

from common.aggregation import AggregationParams, aggregate, running_aggregate

WAYS = ("mean, streamed", "weighted, streamed", "median, rows held", "mean, batch")
MIB = 1024 * 1024


def replies(nodes: int, samples: int, classes: int) -> Iterator[tuple[np.ndarray, int]]:
    """One synthetic reply at a time: (rows (samples, classes) float32 on the simplex, its declared size)."""
    rng = np.random.default_rng(0)
    for _ in range(nodes):
        rows = rng.random((samples, classes), dtype=np.float32) + np.float32(1e-3)
        yield rows / rows.sum(axis=1, keepdims=True), int(rng.integers(100, 1000))


def streamed(rule: str) -> Callable[[int, int, int], np.ndarray]:
    def run(nodes: int, samples: int, classes: int) -> np.ndarray:
        running = running_aggregate(rule, AggregationParams(weight_clip=0.0))
        for rows, size in replies(nodes, samples, classes):
            running.fold(rows, size)
        return running.result().probs
    return run


def batch(nodes: int, samples: int, classes: int) -> np.ndarray:
    held = list(replies(nodes, samples, classes))
    return aggregate("mean", [rows for rows, _ in held], [size for _, size in held]).probs


RUNS = dict(zip(WAYS, (streamed("mean"), streamed("weighted"), streamed("median"), batch), strict=True))


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def child(way: str, nodes: int, samples: int, classes: int) -> None:
    before = peak_bytes()
    probs = RUNS[way](nodes, samples, classes)
    print(json.dumps({"before": before, "peak": peak_bytes(), "shape": list(probs.shape)}))


def measure(way: str, nodes: int, samples: int, classes: int) -> dict[str, int]:
    out = subprocess.run([sys.executable, __file__, "--child", way, "--nodes", str(nodes), "--samples", str(samples),
                          "--classes", str(classes)], check=True, capture_output=True, text=True).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="10,100", help="numbers of institutions, comma-separated")
    parser.add_argument("--samples", type=int, default=10_000, help="public samples per reply (public-size)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--streamed-only", action="store_true", help="skip the ways that hold every row (GiBs at 1,000)")
    parser.add_argument("--child", choices=WAYS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    counts = [int(n) for n in args.nodes.split(",")]
    if args.child:
        child(args.child, counts[0], args.samples, args.classes)
        return
    reply_mib = args.samples * args.classes * 4 / MIB
    print(f"one reply: {args.samples} x {args.classes} float32 = {reply_mib:.2f} MiB; peak RSS per process (MiB), "
          "and its growth while aggregating")
    print(f"{'way':<20}" + "".join(f"{f'{n} nodes':>22}" for n in counts) + f"{'ratio':>8}")
    for way in [w for w in WAYS if w.endswith("streamed") or not args.streamed_only]:
        peaks = [measure(way, n, args.samples, args.classes) for n in counts]
        cells = "".join(f"{p['peak'] / MIB:>11.1f} (+{(p['peak'] - p['before']) / MIB:>6.1f})   " for p in peaks)
        print(f"{way:<20}{cells}{peaks[-1]['peak'] / peaks[0]['peak']:>7.2f}x")


if __name__ == "__main__":
    main()
