"""Joining a Ray cluster: the address checked, an unreachable cluster named with the fix, and what the simulation's
environment carries (simulations/ray_cluster.py, launcher.simulation_env, `fedstill simulate --ray-address`)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from simulations.cli.main import app
from simulations.launcher import simulation_env
from simulations.ray_cluster import RayCluster, RayClusterError, cluster_address, join, summarise, version_problem


@pytest.fixture
def closed_port() -> int:
    """A port nothing listens on: bound, then released."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("given", [None, "", "  "])
def test_no_address_means_a_local_ray_instance(given: str | None) -> None:
    # Execute / Assert
    assert cluster_address(given) is None


def test_a_head_address_is_kept_as_given() -> None:
    # Execute / Assert
    assert cluster_address(" 10.0.0.5:6379 ") == "10.0.0.5:6379"


@pytest.mark.parametrize(("given", "expected"), [
    ("10.0.0.5", "expected the head node's host:port"),
    ("10.0.0.5:port", "expected the head node's host:port"),
    (":6379", "expected the head node's host:port"),
    ("10.0.0.5:70000", "expected the head node's host:port"),
    ("ray://10.0.0.5:10001", "a Ray Client address (ray://) is not supported"),
])
def test_a_malformed_address_is_refused_with_the_form_to_use(given: str, expected: str) -> None:
    # Execute
    with pytest.raises(RayClusterError) as raised:
        cluster_address(given)

    # Assert
    assert expected in str(raised.value) and "ray start --head" in str(raised.value)


def test_an_unreachable_cluster_names_the_address_and_how_to_start_one(closed_port: int) -> None:
    # Prepare
    address = f"127.0.0.1:{closed_port}"

    # Execute
    with pytest.raises(RayClusterError) as raised:
        join(address, cpus_per_client=1, timeout_s=2.0)

    # Assert
    message = str(raised.value)
    assert message.startswith(f"cannot reach a Ray cluster at {address} (")
    assert f"`ray start --head --port {closed_port}`" in message
    assert f"`ray start --address 127.0.0.1:{closed_port}`" in message and "RAY_ADDRESS" in message


def test_the_cluster_counts_live_nodes_only_and_the_clients_that_fit_on_each() -> None:
    # Prepare: Ray keeps a dead node in its table, with no resources
    nodes = [(True, {"CPU": 4.0, "memory": 1e9}), (True, {"CPU": 3.0, "GPU": 1.0}), (False, {"CPU": 8.0}), (True, {})]

    # Execute
    cluster = summarise("10.0.0.5:6379", nodes)

    # Assert
    assert cluster == RayCluster("10.0.0.5:6379", (4.0, 3.0), 1.0)
    assert (cluster.nodes, cluster.cpus) == (2, 7.0)
    assert cluster.client_slots(2) == 3  # 2 on the 4-CPU node, 1 on the 3-CPU node: not 7 // 2
    assert cluster.describe(2) == ("Ray cluster at 10.0.0.5:6379: 2 nodes, 7 CPUs, 1 GPU; 3 clients at a time "
                                   "(2 CPUs each)")


def test_versions_that_differ_are_named_with_both_sides() -> None:
    # Prepare
    metadata = {"ray_version": "2.55.1", "python_version": "3.11.7", "ray_init_cluster": False}

    # Execute
    same = version_problem(metadata, "2.55.1", "3.11.7")
    other = version_problem(metadata, "2.55.1", "3.12.1")

    # Assert
    assert same is None and version_problem(None, "2.55.1", "3.11.7") is None
    assert other is not None and "Python 3.11.7" in other and "Python 3.12.1" in other
    assert "same Python environment" in other


def test_the_simulation_joins_only_the_cluster_it_was_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a RAY_ADDRESS left in the shell must not send a run that was not given one to that cluster
    monkeypatch.setenv("RAY_ADDRESS", "10.9.9.9:6379")

    # Execute
    local = simulation_env(tmp_path, None)
    joined = simulation_env(tmp_path, "10.0.0.5:6379")

    # Assert
    assert "RAY_ADDRESS" not in local
    assert joined["RAY_ADDRESS"] == "10.0.0.5:6379" and joined["FLWR_HOME"] == str(tmp_path)
    assert joined["RAY_USAGE_STATS_ENABLED"] == "0"


@pytest.mark.parametrize("how", ["option", "environment"])
def test_simulate_on_an_unreachable_cluster_exits_1_before_starting_flower(
    tmp_path: Path, closed_port: int, how: str,
) -> None:
    # Prepare: the address from --ray-address, or from RAY_ADDRESS as Ray itself reads it
    address = f"127.0.0.1:{closed_port}"
    args = ["simulate", "digits-tiny", "--set", f"output-dir={tmp_path}", "--set", 'run-name="r"']
    env = {"COLUMNS": "400", "RAY_ADDRESS": address if how == "environment" else ""}

    # Execute
    result = CliRunner().invoke(app, [*args, "--ray-address", address] if how == "option" else args, env=env)

    # Assert
    assert result.exit_code == 1, result.output
    assert f"RayClusterError: cannot reach a Ray cluster at {address}" in result.output
    assert f"ray start --head --port {closed_port}" in result.output
    assert not (tmp_path / "r" / "flwr.log").exists()  # Flower was never started
