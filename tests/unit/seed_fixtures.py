"""Comparison summaries of a few seeds, shaped as `simulations.compare.run_comparison` returns them, for the tests of
the summary across seeds (simulations/seeds.py, seeds_report.py)."""

from __future__ import annotations

from typing import Any

QUORUM = "QuorumError: round 1: 0 valid replies, min-clients is 2"


def round_row(round_: int, accuracy: float, replied: int, uplink: int) -> dict[str, Any]:
    return {"round": round_, "student_accuracy": accuracy, "clients_replied": replied, "uplink_bytes": uplink,
            "downlink_bytes": 0, "wall_s": 1.0}


def run(*rounds: dict[str, Any]) -> dict[str, Any]:
    return {"run_dir": "/tmp/x", "rounds": list(rounds), "final": {"student_accuracy": rounds[-1]["student_accuracy"]}}


def seed_summary(seed: int, mean: dict[str, Any], fedavg: dict[str, Any], local: float, central: float) -> dict[str, Any]:
    return {
        "scenario": {"scenario": "digits-iid", "seed": seed},
        "methods": {"mean": mean},
        "baselines": {
            "fedavg": fedavg,
            "local_only": {"epochs": 2, "accuracy_mean": local, "accuracy_min": local, "accuracy_max": local},
            "centralised": {"epochs": 2, "student": {"model": "cnn-student", "accuracy": central},
                            "teacher": {"model": "cnn-large", "accuracy": central + 0.05}},
        },
    }


def two_seeds() -> dict[int, dict[str, Any]]:
    """Seed 0: mean 0.6 for 2 MB per institution; seed 1: mean 0.7 for 1 + 1.2 = 2.2 MB; FedAvg 0.5 and 0.6 for 9 MB."""
    return {
        0: seed_summary(0, run(round_row(1, 0.4, 3, 3_000_000), round_row(2, 0.6, 3, 3_000_000)),
                        run(round_row(1, 0.5, 3, 27_000_000)), 0.3, 0.8),
        1: seed_summary(1, run(round_row(1, 0.5, 3, 3_000_000), round_row(2, 0.7, 2, 2_400_000)),
                        run(round_row(1, 0.6, 3, 27_000_000)), 0.4, 0.9),
    }
