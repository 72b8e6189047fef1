"""Resuming comparisons and sweeps, the privacy sweep's inputs and table, and `--site` settings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from common.config import RunConfig
from common.errors import ConfigError
from simulations.compare import finished_run
from simulations.privacy_sweep import parse_epsilons, sweep_table
from simulations.provision import parse_site, provision_sites


def write_results(folder: Path, scenario: dict[str, Any], status: str = "completed") -> None:
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"status": status, "scenario": scenario, "rounds": [], "final": {}}))


def test_a_missing_run_is_run(tmp_path: Path, run_config_mapping: dict) -> None:
    # Execute / Assert
    assert finished_run(tmp_path / "mean", RunConfig.from_run_config(run_config_mapping)) is None


def test_a_completed_run_of_the_same_settings_is_reused(tmp_path: Path, run_config_mapping: dict) -> None:
    # Prepare: the launcher filled in the audit paths; an older run may lack newer keys
    cfg = RunConfig.from_run_config(run_config_mapping)
    recorded = {**cfg.to_dict(), "allow-list": "/x/allow-list.toml", "sites-dir": "/x/sites"}
    del recorded["secure-aggregation"]
    write_results(tmp_path / "mean", recorded)

    # Execute
    results = finished_run(tmp_path / "mean", cfg)

    # Assert
    assert results is not None and results["status"] == "completed"


@pytest.mark.parametrize(("status", "change"), [("completed", {"temperature": 9.0}), ("failed", {})])
def test_another_or_unfinished_run_is_moved_aside_not_deleted(
    tmp_path: Path, run_config_mapping: dict, status: str, change: dict
) -> None:
    # Prepare
    cfg = RunConfig.from_run_config(run_config_mapping)
    write_results(tmp_path / "mean", {**cfg.to_dict(), **change}, status)
    (tmp_path / "mean.previous-1").mkdir()

    # Execute
    results = finished_run(tmp_path / "mean", cfg)

    # Assert
    assert results is None
    assert not (tmp_path / "mean").exists()
    assert (tmp_path / "mean.previous-2" / "results.json").is_file()


@pytest.mark.parametrize("asked", [{"max-epsilon": 2.0, "delta": 1e-5}, {"max-epsilon": 1.0, "delta": 1e-5, "class-counts": True},
                                   {"max-epsilon": 1.0, "delta": 1e-5, "institutions": {"institution-1": {"max-epsilon": 4.0}}},
                                   None])
def test_a_run_whose_institutions_had_other_settings_is_another_run(
    tmp_path: Path, run_config_mapping: dict, asked: dict | None
) -> None:
    # Prepare: a completed run of the same config whose institutions were each given a budget of 1
    cfg = RunConfig.from_run_config(run_config_mapping)
    given = {"max-epsilon": 1.0, "delta": 1e-5}
    write_results(tmp_path / "dp", cfg.to_dict())
    provision_sites(tmp_path / "dp", cfg.num_clients, given)

    # Execute
    same = finished_run(tmp_path / "dp", cfg, dict(given))
    other = finished_run(tmp_path / "dp", cfg, asked)

    # Assert: another budget or site policy, for all or one institution, or none, is another run, moved aside
    assert same is not None and same["status"] == "completed"
    assert other is None and not (tmp_path / "dp").exists() and (tmp_path / "dp.previous-1" / "results.json").is_file()


def test_a_run_with_an_unreadable_site_file_is_not_reused(tmp_path: Path, run_config_mapping: dict) -> None:
    # Prepare: one institution's site.toml was damaged after the run
    cfg = RunConfig.from_run_config(run_config_mapping)
    write_results(tmp_path / "dp", cfg.to_dict())
    provision_sites(tmp_path / "dp", cfg.num_clients, {"max-epsilon": 1.0})
    (tmp_path / "dp" / "sites" / "institution-0" / "site.toml").write_text("max-epsilon = = 1")

    # Execute / Assert
    assert finished_run(tmp_path / "dp", cfg, {"max-epsilon": 1.0}) is None


def test_epsilons_are_parsed_sorted_and_checked() -> None:
    # Execute / Assert
    assert parse_epsilons("8, 1,2,4,2") == [1.0, 2.0, 4.0, 8.0]
    for bad in ("", "1,x", "0,1", "-1", "inf"):
        with pytest.raises(ConfigError, match="--epsilons"):
            parse_epsilons(bad)


def test_the_sweep_table_compares_with_the_non_private_run() -> None:
    # Prepare
    summary = {"mechanism": "dp-sgd", "delta": 1e-5, "points": [
        {"label": "none", "budget": None, "accuracy": 0.83, "epsilon_spent_max": None, "teachers": 0.67, "refusals": 0},
        {"label": "eps-4", "budget": 4.0, "accuracy": 0.80, "epsilon_spent_max": 3.999, "teachers": 0.6, "refusals": 0},
        {"label": "eps-1", "budget": 1.0, "error": "RunFailed: boom\nsecond line | pipe"},
    ]}

    # Execute
    table = sweep_table(summary)

    # Assert
    lines = table.splitlines()
    assert "| none (non-private) | 0.8300 |" in table
    assert "| 4 | 0.8000 | -3.00 pts | 3.999 | 0.6000 | 0 |" in table
    assert any(line.startswith("| 1 | failed: RunFailed: boom second line \\| pipe |") for line in lines)


def test_site_settings_for_all_and_for_one_institution() -> None:
    # Execute
    settings = parse_site(["max-epsilon=4", "institution-2.max-epsilon=1", "delta=1e-6"])

    # Assert
    assert settings == {"max-epsilon": 4.0, "delta": 1e-6, "institutions": {"institution-2": {"max-epsilon": 1.0}}}
    assert parse_site([]) is None
    with pytest.raises(ConfigError, match="known institution settings"):
        parse_site(["budget=4"])
    with pytest.raises(ConfigError, match="must be a number"):
        parse_site(["max-epsilon=lots"])
