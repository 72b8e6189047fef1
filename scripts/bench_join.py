"""How long a deployed run waits between its last institution joining and its first round opening.

    .venv/bin/python scripts/bench_join.py [--clients 3] [--dataset fashion-mnist] [--out runs/bench-join]

Brings up the loopback federation (simulations/deploy/local.py: SuperLink with TLS and node
authentication, one SuperNode per institution with its own data folder) with every institution but
the last one, submits the default scenario with `num-clients` = the number of institutions (what
`fedstill run` puts in the run config), starts the last SuperNode once the ServerApp waits for it,
and prints the seconds from that node coming online (as `flwr supernode list` first shows it) to the
`round-opened` entry in the run's ledger. Then it stops the run with `flwr stop` and everything it
started. The ServerApp checks for nodes every WAIT_POLL_S seconds (server/rounds.py), and the
SuperNode polls the SuperLink for messages every few seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import RunConfig, default_run_config  # noqa: E402
from simulations.deploy.local import FEDERATION, LocalFederation  # noqa: E402
from simulations.deploy.site_data import write_site_data  # noqa: E402
from simulations.scenarios import load_scenario  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--scenario", default="fmnist-dirichlet-0.5")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-join"))
    args = parser.parse_args()
    work = (args.out / time.strftime("%Y%m%d-%H%M%S")).resolve()
    scenario = {**load_scenario(args.scenario), "num-clients": args.clients, "min-clients": args.clients,
                "output-dir": str(work / "runs"), "run-name": "join", "node-wait-timeout": 600.0}
    written, _ = write_site_data(RunConfig.from_run_config({**default_run_config(), **scenario}), work / "sites")
    names = [site.name for site in written]
    fed = LocalFederation(work, names, node_configs={s.name: {"data-path": str(s.folder), "partition-id": i}
                                                     for i, s in enumerate(written)})
    try:
        fed.start(join=names[:-1])
        run_id = fed.submit(scenario)
        _wait_for(lambda: _serverapp_waiting(fed, run_id), 300)
        started = time.monotonic()
        fed.start_node(names[-1])
        fed.wait_for_nodes(len(names))
        online = time.monotonic()
        ledger = work / "runs" / "join" / "ledger.jsonl"
        _wait_for(lambda: ledger.exists() and '"round-opened"' in ledger.read_text(), 300)
        opened = time.monotonic()
        fed.flwr("stop", run_id, FEDERATION)
        status = fed.wait(run_id, timeout_s=120)
    finally:
        fed.stop()
    print(f"scenario {args.scenario}, {len(names)} institutions (num-clients {len(names)})")
    print(f"last SuperNode started -> online: {online - started:.1f} s")
    print(f"last SuperNode online -> first round opened: {opened - online:.1f} s")
    print(f"last SuperNode started -> first round opened: {opened - started:.1f} s")
    print(f"run {run_id} then stopped: {status}; results.json status "
          f"{json.loads((work / 'runs' / 'join' / 'results.json').read_text())['status']}")


def _serverapp_waiting(fed: LocalFederation, run_id: str) -> bool:
    """The ServerApp has loaded its data and waits for `num-clients` nodes (server/rounds.wait_for_nodes)."""
    out = fed.flwr("log", run_id, FEDERATION, "--show")
    time.sleep(1.0)
    return "waiting up to" in out.stdout + out.stderr


def _wait_for(condition, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout_s:.0f} s")
        time.sleep(0.1)


if __name__ == "__main__":
    main()
