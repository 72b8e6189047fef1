"""Runs the fedstill app on Flower's simulation engine through `flwr run`, and cleans up after it.

`flwr run` starts a detached local SuperLink and exits 0 even when the ServerApp failed, so the
launcher reads the outcome from the run folder's progress events and from `flwr list`, and stops
the local SuperLink it started, by PID. Each run gets its own Flower home (under FLWR_HOME, or
`.flwr-home/` in the project) and its own free local ports, so simulations can run side by side and
a stale SuperLink of an earlier run is never reused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import RunConfig
from common.errors import FedstillError
from common.files import open_private, private_folder
from server.results.run_folder import PROGRESS, RESULTS, resolve_run_dir
from simulations.provision import ALLOW_LIST, SITES, check_class_counts, provision_sites
from simulations.ray_cluster import ADDRESS_ENV
from simulations.scenarios import to_toml

PROJECT_DIR = Path(__file__).resolve().parents[1]
OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
    "PYTHONWARNINGS": "ignore",
}
POLL_S = 0.5


class RunFailed(FedstillError):
    """The Flower run did not complete."""


@dataclass
class Outcome:
    run_dir: Path
    results: dict[str, Any]
    run_id: str | None
    log_path: Path


def flwr_home() -> Path:
    """FLWR_HOME from the environment, else a project-local folder (never the user's ~/.flwr)."""
    return Path(os.environ.get("FLWR_HOME") or PROJECT_DIR / ".flwr-home").resolve()


def simulate(
    cfg: RunConfig,
    overrides: dict[str, Any],
    *,
    cpus_per_client: int = 1,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    timeout_s: float | None = None,
    site: dict[str, Any] | None = None,
    ray_address: str | None = None,
    client_slots: int | None = None,
) -> Outcome:
    """Run one simulation to the end and return its results; raise RunFailed with the reason if it fails.

    `site` holds every simulated institution's own settings (its budget, `max-epsilon` and `delta`, and its
    site-policy keys; see simulations.provision). `ray_address` names a Ray cluster to run the clients on (checked
    with simulations.ray_cluster.join); None runs them on a Ray instance of this run's own, whatever RAY_ADDRESS says.
    `client_slots`: how many clients that cluster runs at once (default: this machine's CPUs over `cpus_per_client`),
    for `max-in-flight` when neither the scenario nor --set gives it (`windowed`).
    """
    run_dir = resolve_run_dir(cfg)
    earlier = earlier_status(run_dir)
    if earlier == "completed" and cfg.resume:
        return Outcome(run_dir, json.loads((run_dir / RESULTS).read_text()), None, run_dir / "flwr.log")
    if earlier is not None and not cfg.resume:
        raise RunFailed(taken_run_folder(run_dir, earlier))
    private_folder(run_dir, tighten=True)
    provisioned = run_dir / ALLOW_LIST
    if cfg.resume and not cfg.allow_list and not cfg.sites_dir and provisioned.is_file():
        if site:
            raise RunFailed("a resumed run keeps its institutions' settings: they are in "
                            f"{run_dir / SITES}/*/site.toml and site-policy.toml; drop --site")
        overrides = {**overrides, "allow-list": str(provisioned), "sites-dir": str(run_dir / SITES)}  # same keys
    elif not cfg.allow_list and not cfg.sites_dir:
        check_class_counts(cfg, site)
        overrides = {**overrides, **provision_sites(run_dir, cfg.num_clients, site)}
    elif site:
        raise RunFailed("site settings (a privacy budget, a site policy) go into provisioned sites; with allow-list or "
                        "sites-dir set, write them into each institution's site.toml and site-policy.toml yourself")
    overrides = windowed(overrides, client_slots or local_client_slots(cpus_per_client))
    home = flwr_home() / "runs" / f"{run_dir.name}-{os.getpid()}"
    home.mkdir(parents=True, exist_ok=True)
    env = simulation_env(home, ray_address)
    log_path = run_dir / "flwr.log"
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as handle:
        handle.write(to_toml(overrides))
        config_file = handle.name
    command = [
        sys.executable, "-m", "flwr.cli.app", "run", str(PROJECT_DIR), "--run-config", config_file,
        "--federation-config", f"num-supernodes={cfg.num_clients} client-resources-num-cpus={cpus_per_client}",
        "--stream",
    ]
    try:
        with open_private(log_path, "w") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=PROJECT_DIR)
            start = (run_dir / PROGRESS).stat().st_size if (run_dir / PROGRESS).exists() else 0  # a resumed run's
            events = follow_events(process, run_dir / PROGRESS, on_event, timeout_s, start)  # earlier lines are done
        run_id = find_run_id(log_path)
        status = run_status(run_id, env) if run_id else None
    finally:
        os.unlink(config_file)
        for pid in local_superlinks(home):
            stop(pid)
    finished = [e for e in events if e.get("event") == "finished"]
    if finished and finished[-1].get("status") == "completed":
        if status and "failed" in status:
            raise RunFailed(f"Flower reports run {run_id} as {status}; see {log_path}")
        shutil.rmtree(home, ignore_errors=True)  # kept after a failure, for its superlink.log
        return Outcome(run_dir, json.loads((run_dir / RESULTS).read_text()), run_id, log_path)
    if finished:
        raise RunFailed(f"{finished[-1].get('error', 'the run failed')} (log: {log_path})")
    raise RunFailed(f"the run ended without results (Flower status: {status or 'unknown'}); {last_error(log_path)}")


def windowed(overrides: dict[str, Any], slots: int) -> dict[str, Any]:
    """`overrides` with `max-in-flight` = `slots` + 1 unless they set it: a simulation runs `slots` clients at once,
    so the server keeps that many questions out plus one queued for the next free worker, and asks the slowest
    institutions first (server.rounds.Pace); with every question out at once Flower's engine takes them in node order,
    and a round waits on whichever slow institution came last. Measured in docs/quickstart.md."""
    return overrides if "max-in-flight" in overrides else {**overrides, "max-in-flight": slots + 1}


def local_client_slots(cpus_per_client: int) -> int:
    """How many clients a Ray instance on this machine runs at once: one per `cpus_per_client` of the CPUs this
    process may use."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cpus // cpus_per_client)


def simulation_env(home: Path, ray_address: str | None) -> dict[str, str]:
    """The environment of `flwr run`, which its SuperLink and the simulation inherit: offline, this run's own Flower
    home and free local ports, and RAY_ADDRESS only when the clients are to run on that Ray cluster (Flower's Ray
    backend joins the cluster RAY_ADDRESS names, else starts a Ray instance of its own)."""
    http_port, control_port = free_ports(2)
    # `flwr run` starts `flower-superlink` from PATH: make sure it is this environment's.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, **OFFLINE_ENV, "FLWR_HOME": str(home), "PATH": path,
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port), "FLWR_LOCAL_CONTROL_API_PORT": str(control_port)}
    env.pop(ADDRESS_ENV, None)
    if ray_address:
        env[ADDRESS_ENV] = ray_address
    return env


def follow_events(process: subprocess.Popen, path: Path, on_event, timeout_s: float | None, offset: int = 0) -> list[dict]:
    """Read progress events (from byte `offset` on) while `flwr run` streams; return them all once it exits."""
    events: list[dict] = []
    deadline = time.monotonic() + timeout_s if timeout_s else None
    while True:
        done = process.poll() is not None
        if path.exists():
            with path.open("r", encoding="utf-8") as handle:
                handle.seek(offset)
                chunk = handle.read()
            complete = chunk[: chunk.rfind("\n") + 1]
            offset += len(complete.encode("utf-8"))
            for line in complete.splitlines():
                events.append(json.loads(line))
                if on_event:
                    on_event(events[-1])
        if done:
            return events
        if events and events[-1].get("event") == "finished":
            # `flwr run --stream` may linger after the ServerApp ended: give it a moment, then stop it.
            stop_child(process, grace_s=15.0)
            continue
        if deadline and time.monotonic() > deadline:
            stop_child(process)
            raise RunFailed(f"the run exceeded {timeout_s:.0f} s and was stopped")
        time.sleep(POLL_S)


def earlier_status(run_dir: Path) -> str | None:
    """`completed`, `failed`, ... of a run whose results.json is in `run_dir`; None when there is none."""
    try:
        return str(json.loads((run_dir / RESULTS).read_text()).get("status", "unknown"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, AttributeError):
        return "unreadable"


def taken_run_folder(run_dir: Path, earlier: str) -> str:
    """Why a run may not start in `run_dir`, which holds an earlier run's results: it would overwrite them."""
    return (f"run folder {run_dir} already holds results ({earlier}); choose another run-name or output-dir, or set "
            "resume=true to continue an unfinished run")


def find_run_id(log_path: Path) -> str | None:
    return run_id_in(log_path.read_text(errors="replace"))


def run_id_in(output: str) -> str | None:
    """The run id `flwr run` prints when the SuperLink accepted the run."""
    match = re.search(r"Successfully started run (\d+)", output)
    return match.group(1) if match else None


def run_status(run_id: str, env: dict[str, str]) -> str | None:
    """`finished:completed`, `finished:failed`, ... as Flower's `flwr list` reports it."""
    try:
        out = subprocess.run(
            [sys.executable, "-m", "flwr.cli.app", "list", "--run-id", run_id, "--format", "json"],
            capture_output=True, text=True, env=env, cwd=PROJECT_DIR, timeout=60,
        ).stdout
        run = json.loads(out[out.index("{"):])["runs"][0]
    except (ValueError, KeyError, IndexError, subprocess.TimeoutExpired):
        return None
    details = run.get("status-details")
    return f"{run['status']}:{details}" if details and details != "N/A" else run["status"]


def last_error(log_path: Path) -> str:
    """The last error line of the `flwr run` log, with the log's path."""
    found = cli_error_in(log_path.read_text(errors="replace"))
    return f"{found} (log: {log_path})" if found else f"see {log_path}"


def cli_error_in(output: str) -> str | None:
    """The last error of a flwr CLI command's output (Flower's CLI draws errors in a box: take its text)."""
    lines = output.splitlines()
    for index in range(len(lines) - 1, -1, -1):
        if "─ Error ─" in lines[index]:
            box = []
            for line in lines[index + 1:]:
                if line.startswith("╰"):
                    break
                box.append(line.strip(" │"))
            return " ".join(part for part in box if part)
        if "ERROR" in lines[index]:
            return lines[index].strip()
    return None


def local_superlinks(home: Path) -> list[int]:
    """PIDs of local simulation SuperLinks whose files lie under `home`."""
    return [pid for pid, cmd in _superlink_processes() if f"{home}{os.sep}" in cmd]


def free_ports(count: int) -> list[int]:
    """Ports the OS reports free on 127.0.0.1 right now."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def processes_matching(text: str) -> list[tuple[int, str]]:
    """(pid, command line) of every process whose command line contains `text`."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            found.append((int(entry.name), cmd))
    return found


def _superlink_processes() -> list[tuple[int, str]]:
    return processes_matching("flower-superlink")


def stop_child(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Wait up to `grace_s` for a child process, then terminate it, then kill it."""
    for action in (None, process.terminate, process.kill):
        if action:
            action()
        try:
            process.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


def stop(pid: int, grace_s: float = 10.0) -> None:
    """SIGTERM a process that is not our child, then SIGKILL after `grace_s`."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.2)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status
