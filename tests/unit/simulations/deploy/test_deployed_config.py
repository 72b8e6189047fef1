"""The run config of `fedstill run`: scenario < --run-config file < --set, num-clients from the allow-list,
min-clients capped, and the file `flwr run` is given (only what differs from the defaults, plus num-clients)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from common.audit.keys import Signer, write_allow_list
from common.config import default_run_config
from common.errors import ConfigError
from simulations.deploy.deployed_config import resolve_deployed


def allow_list(path: Path, count: int) -> Path:
    write_allow_list(path, {f"institution-{i}": Signer.generate(f"institution-{i}").public for i in range(count)})
    return path


def test_the_file_overrides_the_scenario_and_set_overrides_the_file(tmp_path: Path) -> None:
    # Prepare: digits-tiny has 2 rounds
    (tmp_path / "run.toml").write_text("num-server-rounds = 4\ntemperature = 2.0\n")

    # Execute
    deployed = resolve_deployed("digits-tiny", tmp_path / "run.toml", ["num-server-rounds=5"], tmp_path)

    # Assert
    cfg = deployed.cfg
    assert (cfg.dataset, cfg.temperature, cfg.num_server_rounds) == ("digits", 2.0, 5)
    assert cfg.output_dir == str(tmp_path / "runs") and cfg.run_name.startswith("digits-tiny-")


def test_num_clients_is_the_number_of_institutions_in_the_allow_list(tmp_path: Path) -> None:
    # Prepare: digits-tiny has 3 clients, at least 2
    listed = allow_list(tmp_path / "allow-list.toml", 5)

    # Execute
    deployed = resolve_deployed("digits-tiny", None, [f"allow-list={listed}"], tmp_path)

    # Assert
    assert (deployed.cfg.num_clients, deployed.cfg.min_clients) == (5, 2)
    assert deployed.notes == [f"num-clients = 5: the institutions in the allow-list {listed}"]


def test_min_clients_is_capped_at_the_number_of_institutions(tmp_path: Path) -> None:
    # Prepare: the defaults ask for 10 clients, at least 5; a relative allow-list path
    allow_list(tmp_path / "allow-list.toml", 3)

    # Execute
    deployed = resolve_deployed(None, None, ["allow-list=allow-list.toml"], tmp_path)

    # Assert
    assert (deployed.cfg.num_clients, deployed.cfg.min_clients) == (3, 3)
    assert deployed.cfg.allow_list == str(tmp_path / "allow-list.toml")
    assert "min-clients = 3: capped at num-clients (it was 5)" in deployed.notes


def test_num_clients_given_in_the_file_or_set_wins_over_the_allow_list(tmp_path: Path) -> None:
    # Prepare: an allow-list path that is not readable here (on the SuperLink's host)
    (tmp_path / "run.toml").write_text('allow-list = "/srv/fedstill/allow-list.toml"\nnum-clients = 4\n')

    # Execute
    from_file = resolve_deployed("digits-tiny", tmp_path / "run.toml", [], tmp_path)
    from_set = resolve_deployed("digits-tiny", tmp_path / "run.toml", ["num-clients=6"], tmp_path)

    # Assert
    assert (from_file.cfg.num_clients, from_set.cfg.num_clients) == (4, 6)
    assert from_file.notes == []


def test_an_explicit_min_clients_above_the_institutions_is_refused_not_capped(tmp_path: Path) -> None:
    # Prepare
    listed = allow_list(tmp_path / "allow-list.toml", 3)

    # Execute / Assert
    with pytest.raises(ConfigError, match=r"min-clients must be in \[1, num-clients=3\], got 4"):
        resolve_deployed("digits-tiny", None, [f"allow-list={listed}", "min-clients=4"], tmp_path)


def test_an_unreadable_allow_list_says_num_clients_can_be_given(tmp_path: Path) -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match=r"allow-list .* not found.*or give --set num-clients=N"):
        resolve_deployed("digits-tiny", None, [f"allow-list={tmp_path / 'absent.toml'}"], tmp_path)


def test_the_written_config_holds_what_differs_from_the_defaults_and_num_clients(tmp_path: Path) -> None:
    # Prepare: num-clients equal to its default
    defaults = default_run_config()

    # Execute
    deployed = resolve_deployed(None, None, [f"num-clients={defaults['num-clients']}", "temperature=2.0"], tmp_path)
    written = tomllib.loads(deployed.toml())

    # Assert
    assert written["num-clients"] == defaults["num-clients"] and written["temperature"] == 2.0
    assert written["run-name"] == deployed.cfg.run_name
    assert "seed" not in written and "dataset" not in written
    assert {**defaults, **written} == deployed.cfg.to_dict()


@pytest.mark.parametrize(("name", "message"), [("run.txt", "give a .toml file"), ("absent.toml", "not found")])
def test_a_bad_run_config_file_is_refused(tmp_path: Path, name: str, message: str) -> None:
    # Prepare
    if name.endswith(".txt"):
        (tmp_path / name).write_text("seed = 1\n")

    # Execute / Assert
    with pytest.raises(ConfigError, match=message):
        resolve_deployed("digits-tiny", tmp_path / name, [], tmp_path)
