"""End to end: `fedstill simulate` runs a real Flower simulation (Ray backend, local SuperLink)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from common.models import build_model
from simulations.launcher import OFFLINE_ENV, local_superlinks

pytestmark = pytest.mark.integration
PROJECT = Path(__file__).resolve().parents[2]


def fedstill(*args: str, home: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, **OFFLINE_ENV, "FLWR_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "simulations.cli", *args], capture_output=True, text=True,
        env=env, cwd=PROJECT, timeout=timeout,
    )


@pytest.fixture
def home(tmp_path: Path):
    path = tmp_path / "flwr-home"
    yield path
    assert local_superlinks(path) == [], "the launcher left a local SuperLink running"


def test_tiny_federation_runs_end_to_end(tmp_path: Path, home: Path) -> None:
    # Prepare
    out = tmp_path / "runs"

    # Execute
    result = fedstill("simulate", "digits-tiny", "--set", f"output-dir={out}", "--set", 'run-name="e2e"', home=home)

    # Assert
    assert result.returncode == 0, result.stdout + result.stderr
    run = out / "e2e"
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "completed"
    assert results["scenario"]["num-clients"] == 3
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    for row in results["rounds"]:
        assert row["clients_replied"] == 3 and row["clients_rejected"] == {}
        per_client = list(row["uplink_bytes_per_client"].values())
        # 400 public samples x 10 classes x 2 bytes of float16, plus record framing
        assert all(8_000 < b < 12_000 for b in per_client), per_client
        assert row["uplink_bytes"] == sum(per_client)
        # each teacher continues training from the previous round rather than starting over
        assert set(row["teacher_rounds"].values()) == {row["round"]}
    final = results["final"]
    assert 0.0 < final["student_accuracy"] <= 1.0
    assert final["teacher_accuracy_mean"] is not None
    assert final["student_params"] * 3 < final["largest_teacher_params"]
    student = build_model("cnn-student", 10, (8, 8))
    student.load_state_dict(load_file(str(run / "student.safetensors")))
    assert (run / "accuracy.png").stat().st_size > 0
    assert "student accuracy" in result.stdout


def test_failed_run_exits_nonzero_with_reason(tmp_path: Path, home: Path) -> None:
    # Prepare: no node can answer within a millisecond, so round 1 misses its quorum
    out = tmp_path / "runs"

    # Execute
    result = fedstill("simulate", "digits-tiny", "--set", f"output-dir={out}", "--set", "round-timeout=0.001",
                      "--set", 'run-name="fails"', "--set", "num-server-rounds=1", home=home)

    # Assert
    assert result.returncode == 1
    assert "QuorumError" in result.stdout and "min-clients" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    kept = json.loads((out / "fails" / "results.json").read_text())
    assert kept["status"] == "failed" and "QuorumError" in kept["error"] and kept["rounds"] == []


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("bogus-key=1", "unknown key 'bogus-key'"),
        ("temperature=\"hot\"", "key 'temperature' must be float"),
        ("data-dir=/no/such/folder", "Fashion-MNIST folder /no/such/folder does not exist"),
    ],
)
def test_bad_input_fails_fast_without_traceback(setting: str, expected: str, home: Path) -> None:
    # Execute
    result = fedstill("simulate", "--set", setting, home=home, timeout=120)

    # Assert
    assert result.returncode == 1
    assert expected in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_compare_runs_methods_and_baselines(tmp_path: Path, home: Path) -> None:
    # Prepare: one rule, one variant using FedMD, top-k codec, sampling, schedule and two-stage student
    out = tmp_path / "runs"
    variant = ('fedmd:digest-epochs=1,revisit-epochs=1,codec="topk",codec-top-k=2,public-fraction=0.5,'
               'student-head-epochs=1,temperature-schedule="linear",temperature-final=1.0')

    # Execute
    result = fedstill("compare", "digits-tiny", "--rules", "expertise", "--method", variant,
                      "--fedavg-rounds", "2", "--set", f"output-dir={out}", "--set", 'run-name="cmp"', home=home)

    # Assert
    assert result.returncode == 0, result.stdout + result.stderr
    folder = out / "compare-cmp"
    summary = json.loads((folder / "results.json").read_text())
    assert set(summary["methods"]) == {"expertise", "fedmd"}
    fedmd = summary["methods"]["fedmd"]["rounds"]
    assert [r["temperature"] for r in fedmd] == [3.0, 1.0]
    assert all(r["distilled_samples"] == 200 for r in fedmd)
    # top-2 of 200 rows: 200 x 2 x (2 value bytes + 1 index byte), plus framing
    assert all(1_200 < b < 3_500 for r in fedmd for b in r["uplink_bytes_per_client"].values())
    assert fedmd[0]["digest_failed"] == {} and fedmd[0]["downlink_bytes"] > summary["methods"]["expertise"]["rounds"][0]["downlink_bytes"]
    fedavg = summary["baselines"]["fedavg"]["rounds"]
    assert len(fedavg) == 2
    # FedAvg sends the student's weights: 13,706 float32 parameters per client per round
    assert all(b > 13_706 * 4 for r in fedavg for b in r["uplink_bytes_per_client"].values())
    assert len(summary["baselines"]["local_only"]["per_client"]) == 3
    assert summary["baselines"]["centralised"]["teacher"]["model"] == "cnn-large"
    table = (folder / "comparison.md").read_text()
    assert "| fedmd |" in table and "| fedavg |" in table and "local-only" in table
    assert (folder / "accuracy_per_round.png").stat().st_size > 0
    assert (folder / "accuracy_vs_uplink.png").stat().st_size > 0
