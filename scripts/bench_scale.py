"""Scale on one machine: the same scenario family at 10, 100 and 1,000 institutions, one run after the other.

    .venv/bin/python scripts/bench_scale.py [--clients 10,100,1000] [--scenario fmnist-1000] [--rounds 2]
                                            [--set key=value ...] [--out runs/bench-scale]

Each run is `fedstill simulate SCENARIO` (this checkout's code) with `num-clients` set to N and `min-clients`
to 80 % of N; every other setting is the scenario's, so the server's work per reply is the same at every N.
While it runs, the whole process tree of the run (the CLI, `flwr run`, the SuperLink, the ServerApp, Ray and its
workers) is sampled every 0.5 s from /proc; this script makes itself the tree's subreaper, so processes that
detach (the SuperLink, Ray's daemons) stay in it. Prints one row per N: mean time per round (the ServerApp's own
measure, query to checkpoint), the run's wall time, the server's peak RSS (results.json
`final.server_peak_rss_bytes`: the ServerApp process), the peak of the summed RSS of all processes (pages shared
between processes, such as Ray's object store, are counted once per process), the student's accuracy and the
teachers' mean; then the server's peak at the largest N against the next one (linear rules: at most 1.2x).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROJECT = Path(__file__).resolve().parents[1]
SAMPLE_S = 0.5
PR_SET_CHILD_SUBREAPER = 36
PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 2**20


@dataclass
class Row:
    clients: int
    round_s: float
    wall_s: float
    server_peak: int | None
    total_peak: int
    processes_peak: int
    student: float | None
    teachers: float | None
    replied: int


def become_subreaper() -> None:
    """Orphans of the run (a detached SuperLink, Ray's raylet) are re-parented to this process, not to init, so the
    process tree below it holds every process of the run."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed: the total RSS would miss detached "
                      "processes; run this script on Linux")


def children_of() -> dict[int, list[int]]:
    """Every process's children, from /proc/<pid>/stat (field 4, the parent)."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue  # the process ended
        parent = int(stat[stat.rindex(b")") + 2:].split()[1])
        tree.setdefault(parent, []).append(int(entry))
    return tree


def tree_rss(root: int) -> tuple[int, int]:
    """The summed resident memory (bytes) of `root` and all its descendants, and how many processes there are."""
    tree, total, count, todo = children_of(), 0, 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(tree.get(pid, []))
        try:
            with open(f"/proc/{pid}/statm", "rb") as handle:
                total += int(handle.read().split()[1]) * PAGE
            count += 1
        except (OSError, IndexError, ValueError):
            continue
    return total, count


class Sampler(threading.Thread):
    """Samples the RSS of this process's descendants every SAMPLE_S seconds until stopped; keeps the peaks."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self.processes = 0, 0
        self.done = threading.Event()

    def run(self) -> None:
        me = os.getpid()
        while not self.done.wait(SAMPLE_S):
            total, count = tree_rss(me)
            own = int(open("/proc/self/statm").read().split()[1]) * PAGE  # this script is no part of the run
            self.peak, self.processes = max(self.peak, total - own), max(self.processes, count - 1)


def run_one(clients: int, args: argparse.Namespace, stamp: str) -> Row:
    """One simulation at `clients` institutions, sampled; its row of figures."""
    name = f"scale-{clients}-{stamp}"
    sets = [f"num-clients={clients}", f"min-clients={max(1, math.ceil(0.8 * clients))}",
            f"num-server-rounds={args.rounds}", f'output-dir="{args.out}"', f'run-name="{name}"', *args.set]
    command = [sys.executable, "-m", "simulations.cli.main", "simulate", args.scenario, "--cpus-per-client",
               str(args.cpus_per_client)] + [item for key_value in sets for item in ("--set", key_value)]
    log_path = args.out / f"{name}.log"
    sampler = Sampler()
    started = time.monotonic()
    sampler.start()
    with log_path.open("w") as log:
        code = subprocess.run(command, cwd=PROJECT, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    wall = time.monotonic() - started
    reap_orphans()
    sampler.done.set()
    sampler.join()
    results_path = args.out / name / "results.json"
    if code != 0 or not results_path.is_file():
        raise SystemExit(f"the run at {clients} institutions failed (exit {code}); see {log_path}")
    return row_of(clients, json.loads(results_path.read_text()), wall, sampler)


def reap_orphans() -> None:
    """Wait for the run's detached processes the launcher stopped (this process is their subreaper)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def row_of(clients: int, results: dict[str, Any], wall: float, sampler: Sampler) -> Row:
    rounds, final = results["rounds"], results["final"]
    return Row(
        clients=clients, round_s=sum(r["wall_s"] for r in rounds) / len(rounds), wall_s=wall,
        server_peak=final.get("server_peak_rss_bytes"), total_peak=sampler.peak, processes_peak=sampler.processes,
        student=final.get("student_accuracy"), teachers=final.get("teacher_accuracy_mean"),
        replied=min(r["clients_replied"] for r in rounds),
    )


def print_table(rows: list[Row], scenario: str, rounds: int) -> None:
    print(f"\nscenario {scenario}, {rounds} round(s), min-clients 80 % of num-clients, {os.cpu_count()} CPUs")
    print("| institutions | replied (least) | s / round | run wall s | server peak RSS MiB | total peak RSS MiB "
          "(processes) | student acc | teachers' mean |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        server = f"{r.server_peak / MIB:,.0f}" if r.server_peak else "-"
        print(f"| {r.clients:,} | {r.replied:,} | {r.round_s:.1f} | {r.wall_s:.0f} | {server} | "
              f"{r.total_peak / MIB:,.0f} ({r.processes_peak}) | {_fraction(r.student)} | {_fraction(r.teachers)} |")
    peaks = [r for r in rows if r.server_peak]
    if len(peaks) >= 2:
        small, large = sorted(peaks, key=lambda r: r.clients)[-2:]
        ratio = large.server_peak / small.server_peak  # type: ignore[operator]
        print(f"server peak RSS at {large.clients:,} / at {small.clients:,}: {ratio:.3f}x (linear rules: at most 1.2x)")


def _fraction(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="10,100,1000", help="comma-separated numbers of institutions")
    parser.add_argument("--scenario", default="fmnist-1000", help="the scenario whose other settings every run keeps")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cpus-per-client", type=int, default=1, help="CPUs Ray reserves per simulated client")
    parser.add_argument("--set", action="append", default=[], help="another run-config override (repeatable)")
    parser.add_argument("--out", type=Path, default=PROJECT / "runs" / "bench-scale")
    args = parser.parse_args()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    become_subreaper()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rows = []
    for clients in (int(n) for n in args.clients.split(",")):
        rows.append(run_one(clients, args, stamp))
        print(f"{clients} institutions: {rows[-1].round_s:.1f} s a round", flush=True)
    print_table(rows, args.scenario, args.rounds)


if __name__ == "__main__":
    main()
