"""A whole deployed federation on one machine: the coordinator's SuperLink (TLS, node authentication)
and one SuperNode per institution, each with its own keys, data folder and Flower home.

This is the deployment of docs/deployment.md run on loopback, with every process started here and
stopped here: the deployment integration tests (tests/integration/test_deploy.py) and the deployment
benchmark (scripts/bench_deploy.py) use it; there is no command that starts it.
Each institution's SuperNode is started through `fedstill supernode`, which checks the node's files
and its TLS connection first, exactly as an institution would start it, and runs only the app
bundles on the institution's approved list: at start the federation takes a snapshot of the
fedstill app (`app/`, so that edits to the checkout during a run change nothing) and every
institution approves that snapshot's bundle hash. The SuperLink, whose one port also serves the
Control API, listens on loopback only. Nodes are registered and runs submitted, polled and waited for
through the coordinator's own code (simulations/deploy/coordinator.py), as `fedstill register` and
`fedstill run` do.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client.release import PEERS_FILE
from common.audit.keys import PASSPHRASE_ENV, Signer, private_key_path, write_allow_list, write_key_pair
from common.audit.kinds import COORDINATOR
from common.files import atomic_write_text
from server.results.run_folder import PROGRESS
from simulations.deploy.approved_apps import ApprovedApps, app_fab, fab_hash
from simulations.deploy.certs import (
    CA_CERT,
    NODES,
    SERVER_CERT,
    SERVER_KEY,
    make_ca,
    make_node_key,
    make_server_cert,
    write_node_key,
    write_pem,
)
from simulations.deploy.coordinator import Control, DeployError, ProgressFollower
from simulations.deploy.federation_nodes import register_node
from simulations.deploy.superlink_check import serverapp_environment
from simulations.launcher import OFFLINE_ENV, PROJECT_DIR, free_ports
from simulations.scenarios import to_toml

FEDERATION = "deploy"
ALLOW_LIST = "allow-list.toml"
APPROVED_APPS = "approved-apps.toml"
STARTUP_TIMEOUT_S = 60.0


@dataclass
class Node:
    name: str
    folder: Path  # the institution's own folder: keys, data, release log, privacy ledger, Flower home
    node_config: dict[str, Any]
    port: int
    process: subprocess.Popen | None = None

    @property
    def log_path(self) -> Path:
        return self.folder / "supernode.log"


@dataclass
class LocalFederation:
    """Start with `start()` (or `with`); `run(...)` submits a run with `flwr run` and waits for it."""

    work: Path
    institutions: list[str]
    node_configs: dict[str, dict[str, Any]] = field(default_factory=dict)  # extra node config per institution
    superlink_port: int = 0
    app_hash: str = ""  # the FAB hash of the snapshot in app/, which every institution approves
    nodes: dict[str, Node] = field(default_factory=dict)
    superlink: subprocess.Popen | None = None
    started: list[subprocess.Popen] = field(default_factory=list)  # every process started here, to stop them all

    def __post_init__(self) -> None:
        self.work = Path(self.work).resolve()
        self.certs = self.work / "certs"
        self.home = self.work / "flwr-home"  # the coordinator's flwr CLI and SuperLink
        self.app = self.work / "app"  # the snapshot of the fedstill app that runs are submitted from

    # --- setup -------------------------------------------------------------------------------------

    def provision(self) -> None:
        """What the coordinator and each institution make once: CA + SuperLink certificate, one node
        authentication key and one audit signing key per institution, and the allow-list."""
        ca_key, ca_cert = make_ca("fedstill CA (local deployment)", 30)
        key, cert = make_server_cert(ca_key, ca_cert, ["127.0.0.1", "localhost"], 30)
        write_pem(self.certs / CA_CERT, ca_cert, overwrite=True)
        write_pem(self.certs / SERVER_CERT, cert, overwrite=True)
        write_pem(self.certs / SERVER_KEY, key, private=True, overwrite=True)
        public_keys = {}
        for name in self.institutions:
            folder = self.site(name)
            write_node_key(make_node_key(), self.certs / NODES, name, overwrite=True)
            signer = Signer.generate(name)
            write_key_pair(signer, folder / "keys", overwrite=True)
            public_keys[name] = signer.public
        write_allow_list(self.work / ALLOW_LIST, public_keys)
        for name in self.institutions:  # each institution's own copy: its node checks its peers' keys against it
            write_allow_list(self.site(name) / PEERS_FILE, public_keys)
        # the coordinator's signing key: outside any run folder, encrypted; its passphrase reaches the SuperLink only
        passphrase = secrets.token_urlsafe(24)
        write_key_pair(Signer.generate(COORDINATOR), self.coordinator, passphrase.encode("utf-8"), overwrite=True)
        atomic_write_text(self.coordinator / "passphrase", passphrase + "\n")
        (self.coordinator / "passphrase").chmod(0o600)

    def snapshot_app(self) -> str:
        """Copy the fedstill app's bundle into `app/` (what `flwr run` submits) and have every
        institution approve its hash; returns the hash."""
        if not (self.app / "pyproject.toml").is_file():
            with zipfile.ZipFile(io.BytesIO(app_fab(PROJECT_DIR))) as bundle:
                for name in bundle.namelist():
                    if not name.startswith(".info/"):
                        bundle.extract(name, self.app)
        digest = fab_hash(app_fab(self.app))
        for name in self.institutions:
            ApprovedApps(frozenset({digest})).write(self.site(name) / APPROVED_APPS)
        return digest

    def site(self, name: str) -> Path:
        return self.work / "sites" / name

    def node_config(self, name: str) -> dict[str, Any]:
        """The node config an institution passes to its SuperNode: its audit identity, its ledgers, its
        teacher state, plus what `node_configs` adds (its data path, its privacy budget)."""
        folder = self.site(name)
        if name not in self.institutions:  # a node the federation did not provision (tests of refusals)
            return dict(self.node_configs.get(name, {}))
        config = {
            "institution-id": name,
            "signing-key": str(private_key_path(folder / "keys", name)),
            "release-log": str(folder / "release-log.jsonl"),
            "privacy-ledger": str(folder / "privacy-ledger.json"),
            "state-dir": str(folder / "state"),
        }
        config.update(self.node_configs.get(name, {}))
        return config

    @property
    def coordinator(self) -> Path:
        """The coordinator's key folder (its encrypted signing key; in this loopback federation, its passphrase)."""
        return self.work / "coordinator"

    def run_config(self) -> dict[str, Any]:
        """Run-config keys the coordinator adds to every run on this federation."""
        return {"allow-list": str(self.work / ALLOW_LIST), "coordinator-key": str(private_key_path(self.coordinator, COORDINATOR))}

    # --- processes ---------------------------------------------------------------------------------

    def env(self, home: Path) -> dict[str, str]:
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        return {**os.environ, **OFFLINE_ENV, "FLWR_HOME": str(home), "PATH": path}

    def start(self, join: list[str] | None = None) -> LocalFederation:
        """Provision (once), start the SuperLink, register every institution's node key, and start the SuperNodes
        of `join` (default: every institution; the others can join later with `start_node`)."""
        joining = self.institutions if join is None else join
        self.work.mkdir(parents=True, exist_ok=True)
        if not (self.certs / CA_CERT).is_file():
            self.provision()
        self.app_hash = self.snapshot_app()
        self.superlink_port = self.superlink_port or free_ports(1)[0]
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{FEDERATION}"\n\n[superlink.{FEDERATION}]\n'
            f'address = "127.0.0.1:{self.superlink_port}"\nroot-certificates = "{self.certs / CA_CERT}"\n',
            encoding="utf-8",
        )
        self.start_superlink()
        for name in self.institutions:
            self.register(name)
            if name in joining:
                self.start_node(name)
        self.wait_for_nodes(len(joining))
        return self

    def start_superlink(self) -> None:
        command = [
            str(Path(sys.executable).parent / "flower-superlink"), "--host", "127.0.0.1", "--port", str(self.superlink_port),
            "--ssl-ca-certfile", str(self.certs / CA_CERT), "--ssl-certfile", str(self.certs / SERVER_CERT),
            "--ssl-keyfile", str(self.certs / SERVER_KEY), "--enable-supernode-auth",
            "--database", str(self.work / "superlink.db"), "--disable-runtime-dependency-installation",
        ]
        passphrase = (self.coordinator / "passphrase").read_text(encoding="utf-8").strip()
        env = serverapp_environment({**self.env(self.home), PASSPHRASE_ENV: passphrase})  # nodes never see the passphrase
        self.superlink = _spawn(command, self.work / "superlink.log", env, self.work)
        self.started.append(self.superlink)
        wait_for_port(self.superlink_port, self.superlink, self.work / "superlink.log")

    def register(self, name: str) -> None:
        register_node(self.control, self.certs / NODES / f"{name}.pub", name)  # already registered (earlier start): fine

    def start_node(self, name: str, *, auth_key: Path | None = None, ca: Path | None = None,
                   approved_apps: Path | None = None, extra: list[str] | None = None) -> Node:
        """Start (or restart) an institution's SuperNode through `fedstill supernode`."""
        running = self.nodes[name].process if name in self.nodes else None
        if running is not None and running.poll() is None:
            raise DeployError(f"the SuperNode of {name} is still running; kill_node({name!r}) first")
        folder = self.site(name)
        (folder / "flwr-home").mkdir(parents=True, exist_ok=True)
        port = self.nodes[name].port if name in self.nodes else free_ports(1)[0]
        config = self.node_config(name)
        if approved_apps is None and not (folder / APPROVED_APPS).is_file():  # a node the federation did not provision
            ApprovedApps(frozenset({self.app_hash})).write(folder / APPROVED_APPS)
        command = [
            sys.executable, "-m", "simulations.cli.main", "supernode",
            "--superlink", f"127.0.0.1:{self.superlink_port}",
            "--root-certificates", str(ca or self.certs / CA_CERT),
            "--auth-supernode-private-key", str(auth_key or self.certs / NODES / f"{name}.key"),
            "--node-config", " ".join(f"{k}={json.dumps(v)}" for k, v in config.items()),
            "--approved-apps", str(approved_apps or folder / APPROVED_APPS),
            "--port", str(port), *(extra or []),
        ]
        node = Node(name, folder, config, port)
        node.process = _spawn(command, node.log_path, self.env(folder / "flwr-home"), PROJECT_DIR)
        self.started.append(node.process)
        self.nodes[name] = node
        return node

    def kill_node(self, name: str) -> None:
        """Kill an institution's SuperNode and its ClientApp processes at once (SIGKILL, no goodbye)."""
        node = self.nodes[name]
        if node.process and node.process.poll() is None:
            kill_group(node.process, signal.SIGKILL)

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "flwr.cli.app", *args], capture_output=True, text=True,
                              env=self.env(self.home), cwd=PROJECT_DIR, timeout=timeout)

    @property
    def control(self) -> Control:
        """The coordinator's exchanges with this federation (the same code as `fedstill run` and `register`)."""
        return Control(FEDERATION, lambda args: self.flwr(*args))

    def online_nodes(self) -> list[dict[str, Any]]:
        out = self.flwr("supernode", "list", FEDERATION, "--format", "json")
        try:
            data = json.loads(out.stdout[out.stdout.index("{"):])
        except ValueError:
            return []
        return [n for n in data.get("nodes", []) if str(n.get("status", "")).lower() == "online"]

    def wait_for_nodes(self, count: int, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if len(self.online_nodes()) >= count:
                return
            for node in (self.nodes[n] for n in self.institutions if n in self.nodes):
                if node.process and node.process.poll() is not None:
                    raise DeployError(f"SuperNode of {node.name} exited: {_tail(node.log_path)}")
            time.sleep(1.0)
        raise DeployError(f"fewer than {count} SuperNodes came online within {timeout_s:.0f} s; "
                          f"see {self.work}/sites/*/supernode.log")

    # --- runs --------------------------------------------------------------------------------------

    def submit(self, overrides: dict[str, Any], app: Path | None = None) -> str:
        """`flwr run APP deploy --run-config ...` (APP: the fedstill snapshot unless given); returns the run id.
        Only the fedstill app gets the federation's run-config keys."""
        with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as handle:
            handle.write(to_toml(overrides if app else {**self.run_config(), **overrides}))
            config_file = handle.name
        try:
            return self.control.submit(app or self.app, Path(config_file), log=self.work / "flwr-run.log")
        finally:
            os.unlink(config_file)

    def status(self, run_id: str) -> str | None:
        """`finished:completed`, `finished:failed`, `running`, ... as `flwr list` reports it (None: no answer)."""
        try:
            return self.control.status(run_id).status
        except DeployError:
            return None

    def wait(self, run_id: str, timeout_s: float = 900.0, poll_s: float = 2.0, progress: Path | None = None) -> str:
        """Wait for the run to finish; `progress`, its progress file, tells its end at once (Control.wait's
        `between`): `flwr list` is asked only now and then."""
        follower = ProgressFollower(progress) if progress else None

        def superlink_alive() -> None:
            if self.superlink and self.superlink.poll() is not None:
                raise DeployError(f"the SuperLink exited: {_tail(self.work / 'superlink.log')}")

        def ended_here() -> bool:  # seen in the progress file: stays seen until Flower agrees
            superlink_alive()
            if follower is None:
                return False
            follower.new_events()
            return follower.finished is not None

        return self.control.wait(run_id, timeout_s, poll_s=poll_s, misses=None, on_poll=superlink_alive,
                                 between=ended_here).status

    def run(self, overrides: dict[str, Any], timeout_s: float = 900.0, app: Path | None = None) -> tuple[str, str]:
        """Submit and wait; a run whose `output-dir` and `run-name` are given is followed in its progress file."""
        run_id = self.submit(overrides, app)
        named = "output-dir" in overrides and "run-name" in overrides
        progress = Path(overrides["output-dir"]).expanduser().resolve() / overrides["run-name"] / PROGRESS if named else None
        return run_id, self.wait(run_id, timeout_s, progress=progress)

    def serverapp_pids(self) -> list[int]:
        """The ServerApp processes the SuperLink runs (its `flwr-serverapp` children)."""
        return _descendants(self.superlink.pid, "flwr-serverapp") if self.superlink else []

    # --- teardown ----------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop every SuperNode (with its ClientApps), then the SuperLink (with its ServerApps)."""
        for process in [p for p in self.started if p is not self.superlink] + [self.superlink]:
            if process is not None:
                kill_group(process, signal.SIGTERM)

    def __enter__(self) -> LocalFederation:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _spawn(command: list[str], log_path: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    """Start a process in its own session (so it and its children stop together), output to a log."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)


def kill_group(process: subprocess.Popen, sig: int, grace_s: float = 10.0) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        process.wait(timeout=grace_s)
    # children that outlived their parent (same process group) go too
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_for_port(port: int, process: subprocess.Popen, log_path: Path, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise DeployError(f"the SuperLink exited at start: {_tail(log_path)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.3)
    raise DeployError(f"the SuperLink did not open port {port} within {timeout_s:.0f} s: {_tail(log_path)}")


def _descendants(pid: int, name_part: str) -> list[int]:
    """PIDs of `pid`'s descendants whose command line contains `name_part`."""
    children: dict[int, list[int]] = {}
    commands: dict[int, str] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
            commands[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        parent = int(stat[stat.rfind(")") + 2:].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, queue = [], list(children.get(pid, []))
    while queue:
        child = queue.pop()
        if name_part in commands.get(child, ""):
            found.append(child)
        queue.extend(children.get(child, []))
    return found


def _tail(path: Path, chars: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return f"(no log at {path})"
