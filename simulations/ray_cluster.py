"""Joins a simulation to an existing Ray cluster: the address checked, the cluster reached and described before Flower starts.

Flower's Ray backend calls `ray.init()` with no address, so Ray's own rule applies: with `RAY_ADDRESS`
in its environment the simulation joins that cluster instead of starting a Ray instance of its own.
The launcher passes the address down that way; this module checks first that the address names a Ray
cluster's GCS that answers, that its Ray and Python match this environment's (Ray refuses a driver
that differs), and that one of its nodes has the CPUs one client asks for, so that a wrong address
fails at once with the fix rather than deep inside Flower's simulation log.
"""

from __future__ import annotations

import platform
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from common.errors import FedstillError

ADDRESS_ENV = "RAY_ADDRESS"
HEAD_PORT = 6379  # `ray start --head`'s default port
CONNECT_TIMEOUT_S = 10.0


class RayClusterError(FedstillError):
    """The Ray cluster named by --ray-address (or RAY_ADDRESS) cannot run this simulation."""


@dataclass(frozen=True)
class RayCluster:
    """What a simulation joins: the cluster's address and its live nodes' CPUs and GPUs."""

    address: str
    node_cpus: tuple[float, ...]  # one entry per live node
    gpus: float = 0.0

    @property
    def nodes(self) -> int:
        return len(self.node_cpus)

    @property
    def cpus(self) -> float:
        return sum(self.node_cpus)

    def client_slots(self, cpus_per_client: float) -> int:
        """How many clients run at once: Flower places one actor per `cpus_per_client` CPUs, node by node."""
        return sum(int(cpus // cpus_per_client) for cpus in self.node_cpus)

    def describe(self, cpus_per_client: float) -> str:
        gpus = f", {_count(self.gpus, 'GPU')}" if self.gpus else ""
        return (f"Ray cluster at {self.address}: {_count(self.nodes, 'node')}, {_count(self.cpus, 'CPU')}{gpus}; "
                f"{_count(self.client_slots(cpus_per_client), 'client')} at a time ({_count(cpus_per_client, 'CPU')} each)")


def cluster_address(given: str | None) -> str | None:
    """The cluster's `host:port` from --ray-address (or RAY_ADDRESS), or None to start a local Ray instance."""
    text = (given or "").strip()
    if not text:
        return None
    if text.startswith("ray://"):
        raise RayClusterError(f"--ray-address {text}: a Ray Client address (ray://) is not supported; give the "
                              f"address that `ray start --head` printed, host:port (port {HEAD_PORT} by default)")
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RayClusterError(f"--ray-address {text!r}: expected the head node's host:port, as `ray start --head` "
                              f"prints it (for example 10.0.0.5:{HEAD_PORT})")
    return text


def join(address: str, cpus_per_client: float, timeout_s: float = CONNECT_TIMEOUT_S) -> RayCluster:
    """Reach the cluster at `address`, check it can run this environment's clients, and describe it."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as error:
        raise RayClusterError(unreachable(address, str(error) or type(error).__name__)) from None
    nodes, metadata = _read_cluster(address, timeout_s)
    if (problem := version_problem(metadata, _ray_version(), platform.python_version())) is not None:
        raise RayClusterError(f"the Ray cluster at {address} {problem}")
    cluster = summarise(address, nodes)
    if cluster.nodes == 0:
        raise RayClusterError(f"the Ray cluster at {address} has no live node; restart its head with "
                              f"`ray start --head --port {port}`")
    if cluster.client_slots(cpus_per_client) == 0:
        raise RayClusterError(f"no node of the Ray cluster at {address} has {cpus_per_client:g} CPUs for one client "
                              f"(nodes: {', '.join(f'{c:g}' for c in cluster.node_cpus)} CPUs); lower --cpus-per-client")
    return cluster


def unreachable(address: str, reason: str) -> str:
    """Why the simulation cannot join `address`, and how to start or name the cluster."""
    host, _, port = address.rpartition(":")
    return (f"cannot reach a Ray cluster at {address} ({reason}). Start one on the head machine with "
            f"`ray start --head --port {port}`, join each other machine with `ray start --address {host}:{port}`, "
            "then pass that address (--ray-address or RAY_ADDRESS); or unset RAY_ADDRESS to simulate on this machine alone")


def summarise(address: str, nodes: Iterable[tuple[bool, Mapping[str, float]]]) -> RayCluster:
    """A cluster from its nodes' (alive, total resources); Ray keeps dead nodes in its table, with no resources."""
    alive = [resources for is_alive, resources in nodes if is_alive and resources]
    return RayCluster(address, tuple(float(r.get("CPU", 0.0)) for r in alive),
                      sum(float(r.get("GPU", 0.0)) for r in alive))


def version_problem(metadata: Mapping[str, object] | None, ray_version: str, python_version: str) -> str | None:
    """What differs between the cluster's Ray and Python and this environment's, or None when both match.

    Ray refuses a driver whose Ray version or Python version (to the patch) differs from the cluster's.
    """
    if not metadata:
        return None
    theirs = (str(metadata.get("ray_version")), str(metadata.get("python_version")))
    if theirs == (ray_version, python_version):
        return None
    return (f"runs Ray {theirs[0]} on Python {theirs[1]}, this environment Ray {ray_version} on Python "
            f"{python_version}; every node and this machine need the same Python environment (the fedstill setup)")


def _read_cluster(address: str, timeout_s: float) -> tuple[list[tuple[bool, dict[str, float]]], dict | None]:
    """The live state of each node and the cluster's version metadata, read from its GCS (no Ray driver started)."""
    try:
        from ray._common.usage.usage_lib import get_cluster_metadata
        from ray._raylet import GcsClient  # type: ignore[attr-defined]  # compiled, no stubs
        from ray.core.generated.gcs_pb2 import GcsNodeInfo  # type: ignore[attr-defined]

        client = GcsClient(address=address)
        infos = client.get_all_node_info(timeout=timeout_s).values()
        nodes = [(info.state == GcsNodeInfo.ALIVE, dict(info.resources_total)) for info in infos]
        return nodes, get_cluster_metadata(client)
    except Exception as error:  # noqa: BLE001 - Ray raises several kinds here; each means the same to the user
        raise RayClusterError(f"{address} answers but not as a Ray cluster ({type(error).__name__}: {error}); give the "
                              "address that `ray start --head` printed (the GCS port, not the dashboard's)") from None


def _ray_version() -> str:
    from importlib.metadata import version

    return version("ray")


def _count(number: float, noun: str) -> str:
    return f"{number:g} {noun}{'' if number == 1 else 's'}"
