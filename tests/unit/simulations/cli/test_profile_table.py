"""`fedstill simulate --profile` prints where a round's time went (simulations/cli/run_commands.print_profile)."""

from __future__ import annotations

import dataclasses

from typer.testing import CliRunner

from server.results.schema import RoundPhases, RoundRow
from simulations.cli.console import console
from simulations.cli.main import app
from simulations.cli.run_commands import print_profile

ROW = RoundRow(round=1, student_accuracy=0.5, ensemble_accuracy=0.6, clients_replied=3, clients_rejected={},
               uplink_bytes=0, uplink_bytes_per_client={}, downlink_bytes=0, wall_s=9.0,
               phases=RoundPhases(load=0.5, train=3.0, label=2.0, sign=0.25, node_total=6.0, nodes_timed=3, wait=6.5,
                                  validate=0.25, aggregate=0.25, distil=1.5, evaluate=0.25, checkpoint=0.125,
                                  ledger=0.125, round_s=10.0))


def test_the_profile_table_lists_every_phase_with_its_share_and_the_servers_peak_memory() -> None:
    # Prepare
    results = {"rounds": [ROW.to_json()], "final": {"server_peak_rss_bytes": 512 * 2**20}}

    # Execute
    with console.capture() as captured:
        print_profile(results)
    text = captured.get()

    # Assert
    assert "where a round's time went" in text and "total (slowest node)" in text
    assert "wait" in text and "65.0" in text and "distil" in text and "15.0" in text
    assert "server peak memory (RSS): 512 MiB" in text


def test_a_run_without_profiled_rounds_says_so() -> None:
    # Execute
    with console.capture() as captured:
        print_profile({"rounds": [dataclasses.replace(ROW, phases=None).to_json()], "final": None})

    # Assert
    assert "no profile" in captured.get()


def test_simulate_offers_the_profile_option() -> None:
    # Execute
    result = CliRunner().invoke(app, ["simulate", "--help"], env={"COLUMNS": "200"})

    # Assert
    assert result.exit_code == 0 and "--profile" in result.output
