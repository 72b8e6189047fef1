"""Per-round overhead of the deployed federation against simulation, for the same scenario, in one run.

    .venv/bin/python scripts/bench_deploy.py [--rounds 3] [--clients 3] [--dataset digits] [--out runs/bench-deploy]

Runs the scenario twice on this machine, one after the other: on Flower's simulation engine
(`fedstill simulate`'s launcher) and deployed on loopback (a SuperLink with TLS and node
authentication, one SuperNode per institution reading its own data folder, `flwr run`). Prints each
round's wall time (the ServerApp's own measure, query to checkpoint) and the ratio deployed /
simulated; the first round also pays for starting the ClientApps, so the mean of the later rounds
is given apart. Last, where the nodes' ClientApp tasks spent their time (the runner's log line per task).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import RunConfig, default_run_config  # noqa: E402
from simulations import launcher  # noqa: E402
from simulations.deploy.local import LocalFederation  # noqa: E402
from simulations.deploy.site_data import write_site_data  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--dataset", default="digits", choices=["digits", "fashion-mnist"])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-deploy"))
    args = parser.parse_args()
    out = args.out.resolve()
    scenario = {
        "scenario": f"bench-deploy-{args.dataset}", "dataset": args.dataset, "num-clients": args.clients,
        "min-clients": args.clients, "num-server-rounds": args.rounds, "torch-threads": 1, "output-dir": str(out),
    }
    if args.dataset == "digits":
        scenario.update({"public-size": 500, "teacher-models": "mlp", "student-model": "mlp"})
    stamp = time.strftime("%Y%m%d-%H%M%S")

    sim_cfg = RunConfig.from_run_config({**default_run_config(), **scenario, "run-name": f"simulated-{stamp}"})
    started = time.monotonic()
    simulated = launcher.simulate(sim_cfg, {**scenario, "run-name": f"simulated-{stamp}"}).results
    sim_total = time.monotonic() - started

    work = out / f"federation-{stamp}"
    written, _ = write_site_data(RunConfig.from_run_config({**default_run_config(), **scenario}), work / "sites")
    # partition-id i: its teacher architecture
    fed = LocalFederation(work, [s.name for s in written],
                          node_configs={s.name: {"data-path": str(s.folder), "partition-id": i} for i, s in enumerate(written)})
    started = time.monotonic()
    with fed:
        up = time.monotonic() - started
        run_id, status = fed.run({**scenario, "run-name": f"deployed-{stamp}"})
    dep_total = time.monotonic() - started
    if status != "finished:completed":
        raise SystemExit(f"the deployed run {run_id} ended {status}; see {work}")
    deployed = json.loads((out / f"deployed-{stamp}" / "results.json").read_text())
    sim_rounds = [r["wall_s"] for r in simulated["rounds"]]
    dep_rounds = [r["wall_s"] for r in deployed["rounds"]]
    print(f"scenario: {args.dataset}, {args.clients} institutions, {args.rounds} rounds; {_threads()}")
    print(f"{'round':>5} {'simulated s':>12} {'deployed s':>11} {'ratio':>6}")
    for i, (s, d) in enumerate(zip(sim_rounds, dep_rounds, strict=False), start=1):
        print(f"{i:>5} {s:>12.2f} {d:>11.2f} {d / s:>6.2f}")
    if len(sim_rounds) > 1:
        s, d = statistics.mean(sim_rounds[1:]), statistics.mean(dep_rounds[1:])
        print(f"rounds 2..{len(sim_rounds)} mean: simulated {s:.2f} s, deployed {d:.2f} s, ratio {d / s:.2f}")
    s, d = statistics.mean(sim_rounds), statistics.mean(dep_rounds)
    print(f"all rounds mean: simulated {s:.2f} s, deployed {d:.2f} s, ratio {d / s:.2f}")
    print(f"whole run incl. start-up: simulated {sim_total:.1f} s, deployed {dep_total:.1f} s "
          f"(of which {up:.1f} s to start the SuperLink and SuperNodes), ratio {dep_total / sim_total:.2f}")
    print(f"student accuracy: simulated {simulated['rounds'][-1]['student_accuracy']:.4f}, "
          f"deployed {deployed['rounds'][-1]['student_accuracy']:.4f}")
    _print_tasks(sorted(work.glob("sites/*/supernode.log")))


def _print_tasks(logs: list[Path]) -> None:
    """Where the nodes' ClientApp tasks spent their time: the mean of each step the runner logs
    (simulations/deploy/runner.py, TaskClock), over every task of every node."""
    steps: dict[str, list[float]] = {}
    sizes: list[float] = []
    for log in logs:
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            if "ClientApp task: " not in line:
                continue
            for part in line.split("ClientApp task: ", 1)[1].split(";")[0].split(", "):
                match = re.match(r"(.+?) ([0-9.]+) s(?: \(node state ([0-9.]+) kB\))?$", part)
                if match:
                    steps.setdefault(match[1], []).append(float(match[2]))
                    if match[3]:
                        sizes.append(float(match[3]))
    if not steps:
        return
    count = max(len(v) for v in steps.values())
    print(f"ClientApp tasks ({count}, mean s per step): " + ", ".join(f"{k} {statistics.mean(v):.2f}" for k, v in steps.items())
          + f"; node state received {max(sizes, default=0):.1f} kB at most")


def _threads() -> str:
    return f"{os.cpu_count()} CPUs, torch-threads 1 per client"


if __name__ == "__main__":
    main()
