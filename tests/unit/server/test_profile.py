"""Every run's profile: each round's phases on the nodes and the server (server/profile.py) and the server's peak
memory, recorded in results.json, shown in report.md; the ledger's writes are charged to `ledger` alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from client.release import TIMINGS_CATEGORY
from common.audit import kinds
from common.audit.keys import Signer
from common.audit.ledger import Ledger
from server.profile import DIGITS, RoundClock, node_phases
from server.results.schema import NODE_PHASES, SERVER_PHASES
from simulations.provision import provision_sites

from run_fixtures import Federation, run_server, run_settings

pytestmark = pytest.mark.usefixtures("server_task")


def run_results(tmp_path: Path, name: str, site: dict[str, Any] | None = None, **changes: Any) -> tuple[dict, Path]:
    mapping = run_settings(tmp_path, name, **changes)
    folder = Path(mapping["output-dir"]) / name
    if site is not None:  # the institutions' own policies
        mapping.update(provision_sites(folder, 3, site))
    run_server(Federation(mapping, 7), mapping, 7)
    return json.loads((folder / "results.json").read_text()), folder


def test_a_distillation_run_records_every_phase_of_every_round_and_the_servers_peak_memory(tmp_path: Path) -> None:
    # Execute
    results, folder = run_results(tmp_path, "profiled")

    # Assert
    assert results["status"] == "completed" and results["audit"]["rejections"] == 0  # timings leave signatures intact
    for row in results["rounds"]:
        phases = row["phases"]
        assert phases["nodes_timed"] == 3
        # every phase timed (a fast one may round to 0.0000 s), the heavy ones visibly; figures are rounded each on
        # its own, so sums and comparisons across them allow one unit of the last digit per figure
        assert all(phases[name] >= 0 for name in (*NODE_PHASES, *SERVER_PHASES)), phases
        assert all(phases[name] > 0 for name in ("load", "train", "label", "wait", "distil", "evaluate")), phases
        assert all(phases[name] <= phases["node_total"] for name in NODE_PHASES if name != "node_busy")
        assert phases["node_total"] < phases["node_busy"] <= 3 * phases["node_total"]
        assert sum(phases[name] for name in SERVER_PHASES) <= phases["round_s"] + len(SERVER_PHASES) * 10**-DIGITS
        assert phases["node_total"] <= phases["wait"] + 2 * 10**-DIGITS  # the nodes answer while the server waits
        assert row["wall_s"] <= phases["round_s"] + 1e-3  # wall_s is rounded to milliseconds
    assert results["final"]["server_peak_rss_bytes"] > 100 * 2**20  # a process with torch loaded
    report = (folder / "report.md").read_text()
    assert "## Where the time went" in report and "| node | total (slowest node) |" in report
    accepted = [json.loads(line) for line in (folder / "ledger.jsonl").read_text().splitlines()]
    statements = [json.loads(e["body"]["attestation"]["statement"]) for e in accepted if e["kind"] == kinds.REPLY_ACCEPTED
                  and e["body"]["phase"] == "soft-labels"]
    assert statements and all(TIMINGS_CATEGORY in s["data_categories"] for s in statements)


def test_a_fedavg_run_records_the_phases_that_apply_and_null_for_the_others(tmp_path: Path) -> None:
    # Execute
    results, _ = run_results(tmp_path, "fedavg", method="fedavg")

    # Assert
    for row in results["rounds"]:
        phases = row["phases"]
        assert phases["label"] is None and phases["distil"] is None
        assert phases["nodes_timed"] == 3
        assert all(phases[name] > 0 for name in ("load", "train", "sign", "node_total", "wait", "validate", "aggregate",
                                                 "evaluate", "checkpoint", "ledger"))


def test_an_institution_that_does_not_release_its_size_exactly_sends_no_timings(tmp_path: Path) -> None:
    # Prepare: institution 2 withholds num-examples (sent as 1): its training seconds would give its size away
    site = {"institutions": {"institution-2": {"counts": "withheld"}}}

    # Execute
    results, folder = run_results(tmp_path, "withheld", site=site, **{"num-server-rounds": 1})

    # Assert
    assert results["rounds"][0]["clients_replied"] == 3
    assert results["rounds"][0]["phases"]["nodes_timed"] == 2
    entries = [json.loads(line) for line in (folder / "ledger.jsonl").read_text().splitlines()]
    categories = {e["body"]["institution_id"]: json.loads(e["body"]["attestation"]["statement"])["data_categories"]
                  for e in entries if e["kind"] == kinds.REPLY_ACCEPTED and e["body"]["phase"] == "soft-labels"}
    assert TIMINGS_CATEGORY not in categories["institution-2"] and TIMINGS_CATEGORY in categories["institution-0"]


def test_ledger_writes_inside_a_phase_are_charged_to_the_ledger_only(tmp_path: Path) -> None:
    # Prepare
    ledger = Ledger.open(tmp_path / "ledger.jsonl", Signer.generate("coordinator"))
    clock = RoundClock(ledger)

    # Execute
    with clock.phase("checkpoint"):
        for seq in range(20):
            ledger.append("test", {"seq": seq})
    phases = clock.phases([])

    # Assert
    assert phases.ledger is not None and phases.checkpoint is not None
    assert phases.ledger > 0 and phases.checkpoint < phases.ledger  # the phase kept only its own (tiny) work
    assert phases.checkpoint + phases.ledger <= phases.round_s + 2 * 10**-DIGITS  # each figure rounded on its own
    assert phases.nodes_timed == 0 and phases.node_total is None and phases.node_busy is None and phases.wait is None


def test_node_phases_are_the_largest_over_the_nodes_and_the_slowest_total() -> None:
    # Prepare
    from common.messages import NodeTimings

    timings = [NodeTimings(total=3.0, load=0.5, train=2.0, label=0.25, sign=0.125),
               NodeTimings(total=4.0, load=1.5, train=1.0, label=1.0, sign=0.0625), None]

    # Execute
    phases = node_phases(timings)

    # Assert
    assert phases == {"nodes_timed": 2, "load": 1.5, "train": 2.0, "label": 1.0, "sign": 0.125, "node_total": 4.0,
                      "node_busy": 7.0}
