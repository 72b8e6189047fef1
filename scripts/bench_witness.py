"""What witnessing the ledger costs a run: replay every tree head of a finished simulated run and time it.

Usage: .venv/bin/python scripts/bench_witness.py RUN_FOLDER

For each `tree-head` entry of the run's ledger, on a copy of the ledger cut at that point: the coordinator's
work (leaves, root, signature, each institution's consistency proofs and receipts: server.witness) and each
institution's (its checks against its release log, the cosignature, the log entries: client.witness), then
the coordinator's check and record of each cosignature. Prints the seconds per head and per run against the
run's own round time (results.json `rounds[].wall_s`), as a ratio measured on this machine. The witnessing in
the run itself overlapped with the institutions' training in their own processes; this replay runs it alone, on
one thread, so it is an upper bound of its share of the round time.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from client.release import RELEASE_LOG, Identity
from client.witness import witness
from common.audit import kinds
from common.audit.keys import load_allow_list, load_signer, private_key_path
from common.audit.ledger import Ledger
from server.witness import Witnessing


def main(run: Path) -> None:
    lines = (run / "ledger.jsonl").read_bytes().splitlines(keepends=True)
    entries = [json.loads(line) for line in lines]
    heads = [i for i, e in enumerate(entries) if e["kind"] == kinds.TREE_HEAD]
    bindings = {int(e["body"]["node_id"]): e["body"]["institution_id"] for e in entries
                if e["kind"] == kinds.REPLY_ACCEPTED and e["body"].get("institution_id")}
    allow_list = load_allow_list(run / "allow-list.toml")
    coordinator = load_signer(private_key_path(run, kinds.COORDINATOR), kinds.COORDINATOR)
    sites = run / "sites"
    rounds = json.loads((run / "results.json").read_text())["rounds"]
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        identities = {node: Identity(load_signer(private_key_path(sites / name, name), name), folder / name / RELEASE_LOG)
                      for node, name in bindings.items()}
        spent = []
        for index in heads:
            ledger_path = folder / "ledger.jsonl"
            ledger_path.write_bytes(b"".join(lines[:index]))
            for identity in identities.values():  # each institution's log as it stood: fresh, so nothing is refused
                shutil.rmtree(identity.release_log.parent, ignore_errors=True)
            desk = Witnessing.of(Ledger.open(ledger_path, coordinator), allow_list, bindings)
            started = time.perf_counter()
            requests = desk.requests(sorted(identities))
            for node, identity in identities.items():
                problem = desk.record(node, identity.signer.name, witness(requests[node], identity).as_dict())
                assert problem is None, problem
            spent.append(time.perf_counter() - started)
    round_s = sum(float(r["wall_s"]) for r in rounds)
    print(f"run {run.name}: {len(entries)} ledger entries, {len(heads)} tree heads, {len(identities)} institutions")
    print(f"witnessing, replayed: {sum(spent):.3f} s in all, {max(spent) * 1000:.1f} ms at most per head "
          f"({sum(spent) / max(len(spent), 1) * 1000:.1f} ms on average)")
    print(f"rounds: {round_s:.1f} s in all ({len(rounds)} rounds); witnessing / round time = {sum(spent) / round_s:.2%}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
