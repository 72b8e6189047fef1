"""The runbook of docs/deployment.md, run as written: a coordinator and three institutions, on loopback,
from empty folders to a verified ledger, every process stopped at the end.

The commands come out of the page itself (fenced blocks tagged `runbook=ROLE`), so the doc cannot
drift from what works. The test supplies only what the two settings blocks leave to the reader (the
same variable names, checked), moves the files the "sends" blocks list between the parties (all
public, checked), and puts each institution's own data in its folder (its share of `digits-tiny`,
as `fedstill site-data` writes it). Services (the SuperLink, the SuperNodes) run in the background
and are stopped with SIGTERM, as the doc says.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from common.audit.verify import verify_ledger
from common.config import RunConfig, default_run_config
from simulations.deploy.local import kill_group, wait_for_port
from simulations.deploy.site_data import write_site_data
from simulations.launcher import OFFLINE_ENV, PROJECT_DIR, free_ports, processes_matching
from simulations.scenarios import load_scenario

DOC = PROJECT_DIR / "docs" / "deployment.md"
BLOCK = re.compile(r"^```(\w+) runbook=([\w-]+)\n(.*?)^```\n", re.MULTILINE | re.DOTALL)
INSTITUTIONS = ["hospital-a", "bank-b", "clinic-c"]
SCENARIO = "digits-tiny"
RUN_NAME = "runbook"
BLOCK_TIMEOUT_S = 600.0
ONLINE_TIMEOUT_S = 90.0


@dataclass(frozen=True)
class Block:
    role: str  # coordinator, institution, coordinator-service, send-institution, ...
    text: str


@dataclass
class Runbook:
    """The parties' environments, the services running, and every command's output (for failures)."""

    tmp: Path
    coordinator: dict[str, str] = field(default_factory=dict)
    institutions: dict[str, dict[str, str]] = field(default_factory=dict)
    services: list[subprocess.Popen] = field(default_factory=list)
    transcript: list[str] = field(default_factory=list)

    @property
    def run_dir(self) -> Path:
        return Path(self.coordinator["FEDSTILL"]) / "runs" / RUN_NAME

    def site(self, name: str) -> Path:
        return Path(self.institutions[name]["SITE"])


def read_runbook(path: Path = DOC) -> list[Block]:
    return [Block(role, text) for _, role, text in BLOCK.findall(path.read_text(encoding="utf-8"))]


def settings_names(text: str) -> set[str]:
    """The variables a settings block sets: `export NAME=...` and `read ... NAME && export NAME`."""
    return set(re.findall(r"^export (\w+)=", text, re.MULTILINE)) | set(re.findall(r"^read .* (\w+) &&", text, re.MULTILINE))


def expand(text: str, env: dict[str, str]) -> str:
    """`$NAME` and `${NAME}` from `env`; a name `env` lacks is an error (the doc uses an unset variable)."""
    return re.sub(r"\$\{?(\w+)\}?", lambda m: env[m.group(1)], text)


# --- the parties ----------------------------------------------------------------------------------------


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FEDSTILL_", "FLWR_HOME"))}
    return {**env, **OFFLINE_ENV, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"}


def parties(tmp: Path) -> Runbook:
    book = Runbook(tmp)
    superlink_port, *node_ports = free_ports(1 + len(INSTITUTIONS))
    fedstill = tmp / "coordinator" / "fedstill"
    book.coordinator = {
        **base_env(), "FEDSTILL": str(fedstill), "FEDSTILL_CA": str(tmp / "coordinator" / "ca"),
        "FEDSTILL_APP": str(PROJECT_DIR), "FLWR_HOME": str(fedstill / "flwr"), "SUPERLINK_HOST": "localhost",
        "SUPERLINK_PORT": str(superlink_port), "INSTITUTIONS": " ".join(INSTITUTIONS), "SCENARIO": SCENARIO,
        "RUN_NAME": RUN_NAME, "FEDSTILL_CA_PASSPHRASE": secrets.token_urlsafe(16),
        "FEDSTILL_KEY_PASSPHRASE": secrets.token_urlsafe(16),
    }
    for name, port in zip(INSTITUTIONS, node_ports, strict=True):
        site = tmp / name / "site"
        book.institutions[name] = {
            **base_env(), "NAME": name, "SITE": str(site), "FEDSTILL_APP": str(PROJECT_DIR),
            "FLWR_HOME": str(site / "flwr"), "SUPERLINK": f"localhost:{superlink_port}", "NODE_PORT": str(port),
        }
    for folder in [tmp / "coordinator", *(tmp / n for n in INSTITUTIONS)]:
        folder.mkdir(parents=True, exist_ok=True)
    return book


def cwd_of(env: dict[str, str], book: Runbook) -> Path:
    """Each party runs its commands from its own home, not from the checkout: relative paths would break."""
    return book.tmp / (env.get("NAME") or "coordinator")


def run_block(book: Runbook, block: Block, env: dict[str, str]) -> None:
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", block.text], env=env, cwd=cwd_of(env, book),
                         capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
    who = env.get("NAME", "coordinator")
    book.transcript.append(f"--- {who}: {block.text}--- exit {out.returncode}\n{out.stdout}{out.stderr}")
    assert out.returncode == 0, f"{who}'s block failed (exit {out.returncode}):\n{block.text}\n{out.stdout[-4000:]}{out.stderr[-4000:]}"


def start_service(book: Runbook, block: Block, env: dict[str, str]) -> subprocess.Popen:
    who = env.get("NAME", "coordinator")
    log = (book.tmp / f"{who}.service.log").open("ab")
    process = subprocess.Popen(["bash", "-euo", "pipefail", "-c", block.text], env=env, cwd=cwd_of(env, book),
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    book.services.append(process)
    return process


def send(book: Runbook, block: Block, sender: dict[str, str], receiver: dict[str, str]) -> None:
    """Copy each `SOURCE -> DESTINATION` line: source in the sender's terms, destination in the receiver's
    (plus the sender's NAME). Everything that travels is public."""
    for line in filter(None, (raw.strip() for raw in block.text.splitlines())):
        source, destination = (part.strip() for part in line.split("->"))
        source_path = Path(expand(source, sender))
        destination_path = Path(expand(destination, {**receiver, "NAME": sender.get("NAME", receiver.get("NAME", ""))}))
        assert b"PRIVATE KEY" not in source_path.read_bytes(), f"the runbook sends a private key: {source_path}"
        destination_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source_path, destination_path)


def give_data(book: Runbook) -> None:
    """What each institution does by hand: its own data into `$SITE/data` (here its share of the scenario)."""
    cfg = RunConfig.from_run_config({**default_run_config(), **load_scenario(SCENARIO), "num-clients": len(INSTITUTIONS)})
    written, _ = write_site_data(cfg, book.tmp / "data-source", fmt="idx")
    for name, site in zip(INSTITUTIONS, written, strict=True):
        for file in site.folder.iterdir():
            shutil.copyfile(file, book.site(name) / "data" / file.name)


def online(book: Runbook) -> int:
    try:
        nodes = flwr_json(book, "supernode", "list", "remote")["nodes"]
    except (ValueError, KeyError):
        return 0
    return sum(str(node.get("status")).lower() == "online" for node in nodes)


def wait_online(book: Runbook, count: int) -> None:
    deadline = time.monotonic() + ONLINE_TIMEOUT_S
    while online(book) < count:
        assert all(p.poll() is None for p in book.services), "a service exited; see the *.service.log files"
        assert time.monotonic() < deadline, f"fewer than {count} SuperNodes came online within {ONLINE_TIMEOUT_S:.0f} s"
        time.sleep(1.0)


def stop_services(book: Runbook) -> None:
    """SIGTERM each service's process group, nodes first, then the SuperLink; SIGKILL what outlives the grace."""
    for process in reversed(book.services):
        kill_group(process, signal.SIGTERM, grace_s=20.0)


# --- the runbook, in the page's order --------------------------------------------------------------------


def follow(book: Runbook, blocks: list[Block]) -> None:
    for block in blocks:
        if block.role == "coordinator-settings":
            assert settings_names(block.text) == set(book.coordinator) - set(base_env()), "coordinator settings drifted"
        elif block.role == "institution-settings":
            assert settings_names(block.text) == set(book.institutions[INSTITUTIONS[0]]) - set(base_env()), \
                "institution settings drifted"
        elif block.role == "coordinator":
            run_block(book, block, book.coordinator)
        elif block.role == "institution":
            for env in book.institutions.values():
                run_block(book, block, env)
            if "institution-init" in block.text:
                give_data(book)
        elif block.role == "coordinator-service":
            service = start_service(book, block, book.coordinator)
            wait_for_port(int(book.coordinator["SUPERLINK_PORT"]), service, book.tmp / "coordinator.service.log")
        elif block.role == "institution-service":
            for env in book.institutions.values():
                start_service(book, block, env)
            wait_online(book, len(INSTITUTIONS))
        elif block.role == "send-coordinator":
            for env in book.institutions.values():
                send(book, block, book.coordinator, env)
        elif block.role == "send-institution":
            for env in book.institutions.values():
                send(book, block, env, book.coordinator)
        else:
            raise AssertionError(f"docs/deployment.md has a block tagged runbook={block.role}, which this test does not know")


@pytest.fixture(scope="module")
def runbook(tmp_path_factory) -> Iterator[Runbook]:
    book = parties(tmp_path_factory.mktemp("runbook"))
    started = time.monotonic()
    try:
        follow(book, read_runbook())
        book.transcript.append(f"runbook wall time {time.monotonic() - started:.1f} s")
        yield book
    finally:
        stop_services(book)
        (book.tmp / "transcript.txt").write_text("\n".join(book.transcript), encoding="utf-8")
    time.sleep(1.0)
    assert all(p.poll() is not None for p in book.services), "a service is still running"
    left = [cmd for pid, cmd in processes_matching(str(book.tmp)) if pid != os.getpid()]
    assert left == [], f"processes outlived the runbook: {left}"


def test_the_doc_tags_every_step_of_both_roles() -> None:
    # Execute
    roles = [block.role for block in read_runbook()]

    # Assert: both settings, both services, both directions of sending, and commands of both roles
    assert {"coordinator-settings", "institution-settings", "coordinator", "institution", "coordinator-service",
            "institution-service", "send-coordinator", "send-institution"} == set(roles)
    assert roles.index("coordinator-service") < roles.index("institution-service")


def test_the_runbook_ends_with_a_verified_federation(runbook: Runbook) -> None:
    # Assert: the run completed with all three institutions in every round
    results = json.loads((runbook.run_dir / "results.json").read_text())
    assert results["status"] == "completed"
    assert results["scenario"]["num-clients"] == len(INSTITUTIONS)
    assert [r["clients_replied"] for r in results["rounds"]] == [len(INSTITUTIONS)] * len(results["rounds"])
    assert sorted(results["audit"]["institutions"].values()) == sorted(INSTITUTIONS)

    # the ledger verifies with every institution's release log
    logs = [runbook.site(name) / "release-log.jsonl" for name in INSTITUTIONS]
    report = verify_ledger(runbook.run_dir / "ledger.jsonl", client_logs=logs)
    assert report.ok, report.problems

    # no private key of one party in another's folders; records and keys owner-only
    coordinator_keys = {p.name for p in (runbook.tmp / "coordinator").rglob("*.key")}
    assert coordinator_keys == {"ca.key", "superlink.key", "coordinator.key"}
    for name in INSTITUTIONS:
        site_keys = {p.name for p in runbook.site(name).rglob("*.key")}
        assert site_keys == {f"{name}.key", f"{name}-node.key"}
    private = [runbook.run_dir / "results.json", runbook.run_dir / "ledger.jsonl",
               Path(runbook.coordinator["FEDSTILL"]) / "state" / "superlink.db", *logs]
    assert {str(p): oct(p.stat().st_mode & 0o777) for p in private} == {str(p): "0o600" for p in private}


def test_a_run_stopped_with_flwr_stop_is_recorded_as_stopped(runbook: Runbook) -> None:
    # Prepare: a longer run on the same federation, followed by `fedstill run` as the runbook starts it
    env, fedstill = runbook.coordinator, Path(runbook.coordinator["FEDSTILL"])
    command = ["fedstill", "run", SCENARIO, "--federation", "remote", "--run-config", str(fedstill / "run.toml"),
               "--app", env["FEDSTILL_APP"], "--set", 'run-name="stopped"', "--set", "num-server-rounds=4"]
    follower = subprocess.Popen(command, env=env, cwd=runbook.tmp / "coordinator", stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    ledger = fedstill / "runs" / "stopped" / "ledger.jsonl"
    try:
        deadline = time.monotonic() + 180
        while not (ledger.exists() and '"round-opened"' in ledger.read_text()):
            assert follower.poll() is None and time.monotonic() < deadline, "the run to stop never opened a round"
            time.sleep(0.2)

        # Execute: the coordinator stops it while round 1 waits for its replies
        [run_id] = [run["run-id"] for run in flwr_json(runbook, "list", "remote")["runs"] if run["status"] == "running"]
        stop = subprocess.run([sys.executable, "-m", "flwr.cli.app", "stop", run_id, "remote"], env=env,
                              cwd=runbook.tmp / "coordinator", capture_output=True, text=True, timeout=60)
        output, _ = follower.communicate(timeout=180)
    finally:
        if follower.poll() is None:
            follower.kill()

    # Assert: Flower, `fedstill run` and the run folder all say stopped
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert follower.returncode == 1 and f"run {run_id} was stopped" in output
    assert flwr_json(runbook, "list", "remote", "--run-id", run_id)["runs"][0]["status"] == "finished:stopped"
    results = fedstill / "runs" / "stopped" / "results.json"
    status = json.loads(results.read_text())["status"] if results.exists() else None
    kinds = [json.loads(line)["kind"] for line in ledger.read_text().splitlines()]
    assert "run-failed" not in kinds and status != "failed"
    if status in (None, "running"):
        # Flower ended the process before the ServerApp could record the stop (its heartbeat thread met the stop
        # first, or the ServerApp took longer than Flower's 5 s to exit on a loaded machine: server/stopping.py):
        # the folder is as a killed run leaves it, and resumes the same way
        assert "run-stopped" not in kinds
    else:
        assert status == "stopped" and "run-stopped" in kinds


def flwr_json(book: Runbook, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "flwr.cli.app", *args, "--format", "json"], env=book.coordinator,
                         cwd=book.tmp / "coordinator", capture_output=True, text=True, timeout=60)
    return json.loads(out.stdout[out.stdout.index("{"):])
