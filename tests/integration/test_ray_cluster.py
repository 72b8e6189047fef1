"""End to end on a two-node Ray cluster started on this machine: `fedstill simulate --ray-address` runs its ClientApps on
both nodes, and the test stops the cluster it started, and only that one.

`ray stop` stops every Ray process on the machine, other simulations' included, so the cluster is stopped by PID
instead: each `ray start` runs in a session of its own, every process it leaves (GCS, raylets, their agents and
workers) stays in that session, and the fixture signals exactly the processes of those two sessions, then asserts none
is left.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from simulations.launcher import OFFLINE_ENV, free_ports

from run_cli import fedstill

pytestmark = pytest.mark.integration

RAY = Path(sys.executable).parent / "ray"
START_TIMEOUT_S = 120.0
NODES_TIMEOUT_S = 60.0
NODE_FLAGS = ("--num-cpus", "1", "--object-store-memory", str(100 * 2**20), "--disable-usage-stats")


def session_processes(sessions: set[int]) -> list[int]:
    """PIDs of the live processes in these sessions: all that a `ray start` run in a session of its own left behind,
    its workers included (Ray renames them, `ray::ClientAppActor.run`, so their command lines name nothing)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            state, _, _, sid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:4]
        except (OSError, ValueError):
            continue  # gone meanwhile
        if int(sid) in sessions and state != "Z":
            found.append(int(entry.name))
    return found


def stop_sessions(sessions: set[int], grace_s: float = 3.0) -> list[int]:
    """SIGTERM every process of these sessions, SIGKILL what is left after `grace_s`; return the survivors."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        for pid in session_processes(sessions):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while session_processes(sessions) and time.monotonic() < deadline:
            time.sleep(0.2)
    return session_processes(sessions)


def ray_start(args: list[str], env: dict[str, str], what: str, sessions: set[int]) -> None:
    """`ray start` in a session of its own (recorded in `sessions` at once, for the clean-up), to its end."""
    process = subprocess.Popen([str(RAY), "start", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=env, start_new_session=True)
    sessions.add(process.pid)
    try:
        output, _ = process.communicate(timeout=START_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"`ray start` of the {what} took over {START_TIMEOUT_S:.0f} s")
    assert process.returncode == 0, f"`ray start` of the {what} failed:\n{output[-4000:]}"


def alive_nodes(address: str) -> set[str]:
    """Hex ids of the cluster's live nodes, read from its GCS."""
    from ray._raylet import GcsClient
    from ray.core.generated.gcs_pb2 import GcsNodeInfo

    infos = GcsClient(address=address).get_all_node_info(timeout=10).values()
    return {info.node_id.hex() for info in infos if info.state == GcsNodeInfo.ALIVE}


def client_app_runs(address: str) -> Counter[str]:
    """How many `ClientAppActor.run` tasks (one per message a ClientApp handled) each node ran, from Ray's task events."""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        reply = gcs_service_pb2_grpc.TaskInfoGcsServiceStub(channel).GetTaskEvents(
            gcs_service_pb2.GetTaskEventsRequest(), timeout=10)
    return Counter(event.state_updates.node_id.hex() for event in reply.events_by_task
                   if event.task_info.name == "ClientAppActor.run" and event.state_updates.node_id)


@pytest.fixture
def ray_cluster() -> Iterator[str]:
    """A head and a second node, one CPU each, in a temp dir of their own; stopped (only they) afterwards."""
    temp = tempfile.mkdtemp(prefix="fsray-", dir="/tmp")  # short: Ray's socket paths live under it
    port, client_port = free_ports(2)
    address = f"127.0.0.1:{port}"
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env.update({**OFFLINE_ENV, "RAY_TMPDIR": temp})  # RAY_TMPDIR: no ray_current_cluster in /tmp/ray for others to join
    sessions: set[int] = set()
    try:
        ray_start(["--head", "--port", str(port), "--ray-client-server-port", str(client_port),
                   "--include-dashboard=false", "--temp-dir", temp, *NODE_FLAGS], env, "head node", sessions)
        ray_start(["--address", address, "--temp-dir", temp, *NODE_FLAGS], env, "second node", sessions)
        deadline = time.monotonic() + NODES_TIMEOUT_S
        while len(alive_nodes(address)) < 2:
            assert time.monotonic() < deadline, f"the second node did not join the cluster at {address} in {NODES_TIMEOUT_S:.0f} s"
            time.sleep(0.5)
        yield address
    finally:
        survivors = stop_sessions(sessions)
        shutil.rmtree(temp, ignore_errors=True)
    assert survivors == [], f"processes of the test's Ray cluster survived SIGKILL: {survivors}"


def test_a_simulation_on_a_two_node_ray_cluster_runs_clientapps_on_both_nodes(
    ray_cluster: str, tmp_path: Path, home: Path,
) -> None:
    # Prepare
    out = tmp_path / "runs"
    nodes = alive_nodes(ray_cluster)

    # Execute: a short digits-tiny (1 round) on the cluster
    result = fedstill("simulate", "digits-tiny", "--ray-address", ray_cluster, "--timeout", "240",
                      "--set", f"output-dir={out}", "--set", 'run-name="ray"', "--set", "num-server-rounds=1",
                      "--set", "local-epochs=1", "--set", "student-epochs=1", "--set", "teacher-models=\"cnn-small\"",
                      home=home, timeout=300)

    # Assert: it said which cluster it joined, and completed with every institution's reply
    assert result.returncode == 0, result.stdout + result.stderr
    said = " ".join(result.stdout.split())  # the console wraps long lines
    assert f"joining Ray cluster at {ray_cluster}: 2 nodes, 2 CPUs; 2 clients at a time" in said
    results = json.loads((out / "ray" / "results.json").read_text())
    assert results["status"] == "completed" and [r["clients_replied"] for r in results["rounds"]] == [3]
    # each node ran ClientApps (task events reach the GCS within a second or so of the run's end)
    deadline = time.monotonic() + 20.0
    while set(runs := client_app_runs(ray_cluster)) != nodes and time.monotonic() < deadline:
        time.sleep(1.0)
    assert set(runs) == nodes, f"ClientApp runs per node: {dict(runs)}; the cluster's nodes: {sorted(nodes)}"
    assert sum(runs.values()) >= 3  # one query per institution at least
