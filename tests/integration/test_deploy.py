"""The deployed federation on loopback: a SuperLink with TLS and node authentication, three SuperNodes
with their own data folders and keys; refusals (an unregistered node, a wrong CA, an app the institutions did
not approve: every node refuses it before any of its code runs) and faults. (A whole run from nothing to a verified
ledger is tests/integration/test_runbook.py, which follows docs/deployment.md.)"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from common.audit.verify import verify_ledger
from common.config import RunConfig, default_run_config
from simulations.deploy.approved_apps import app_fab, fab_hash
from simulations.deploy.certs import make_ca, make_node_key, write_node_key, write_pem
from simulations.deploy.local import LocalFederation
from simulations.deploy.site_data import write_site_data
from simulations.launcher import processes_matching

INSTITUTIONS = ["institution-0", "institution-1", "institution-2"]
SCENARIO = {
    "scenario": "deploy-digits", "dataset": "digits", "num-clients": 3, "min-clients": 2, "public-size": 500,
    "teacher-models": "mlp", "student-model": "mlp", "torch-threads": 1, "round-timeout": 120.0,
}

HOSTILE_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "hostile"
version = "1.0.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "mallory"

[tool.flwr.app.components]
serverapp = "hostile_server:app"
clientapp = "hostile_client:app"

[tool.flwr.app.config]
result-file = ""
"""

# Imported by a node only if the node ran the app's code: the marker file proves it did.
HOSTILE_CLIENT = """\
from pathlib import Path

Path({marker!r}).write_text("the hostile ClientApp was imported on a node")

from flwr.app import Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query("probe")
def probe(msg, context):
    return Message(RecordDict(), reply_to=msg)
"""

# The coordinator side of the hostile app: it asks every node and writes down what each answered.
HOSTILE_SERVER = """\
import json
import time
from pathlib import Path

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context) -> None:
    deadline = time.monotonic() + 60
    while len(grid.get_node_ids()) < {nodes} and time.monotonic() < deadline:
        time.sleep(1)
    messages = [Message(RecordDict(), dst_node_id=n, message_type="query.probe") for n in grid.get_node_ids()]
    replies = grid.send_and_receive(messages, timeout=90)
    answers = {{str(r.metadata.src_node_id): (r.error.reason if r.has_error() else "ran") for r in replies}}
    Path(context.run_config["result-file"]).write_text(json.dumps(answers))
"""


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    work = tmp_path_factory.mktemp("deploy")
    cfg = RunConfig.from_run_config({**default_run_config(), **SCENARIO})
    written, _ = write_site_data(cfg, work / "sites", fmt="idx")  # each institution's own data folder
    configs = {site.name: {"data-path": str(site.folder)} for site in written}
    assert sorted(configs) == INSTITUTIONS
    fed = LocalFederation(work, INSTITUTIONS, node_configs=configs)
    with fed:
        yield fed
    time.sleep(1.0)
    assert all(p.poll() is not None for p in fed.started), "a started process is still running"
    assert _processes_under(work) == [], "a SuperLink, SuperNode, ServerApp or ClientApp outlived the federation"


def run_dir(fed: LocalFederation, name: str) -> Path:
    return fed.work / "runs" / name


def settings(fed: LocalFederation, name: str, **extra) -> dict:
    return {**SCENARIO, "output-dir": str(fed.work / "runs"), "run-name": name, **extra}


def test_a_node_whose_key_is_not_registered_is_refused(federation: LocalFederation, tmp_path: Path) -> None:
    # Prepare: a node key the coordinator never registered
    write_node_key(make_node_key(), tmp_path, "rogue")
    federation.node_configs["rogue"] = {}

    # Execute
    node = federation.start_node("rogue", auth_key=tmp_path / "rogue.key", extra=["--max-retries", "1"])
    code = node.process.wait(timeout=120)

    # Assert
    assert code != 0
    assert "Failed to activate SuperNode" in node.log_path.read_text()
    assert len(federation.online_nodes()) == len(INSTITUTIONS)


def test_a_node_given_the_wrong_ca_fails_with_a_clear_error(federation: LocalFederation, tmp_path: Path) -> None:
    # Prepare: a CA that did not sign the SuperLink's certificate
    _, other_ca = make_ca("somebody else's CA", 1)
    write_pem(tmp_path / "ca.crt", other_ca)
    federation.node_configs["wrong-ca"] = {}

    # Execute
    node = federation.start_node("wrong-ca", ca=tmp_path / "ca.crt", auth_key=federation.certs / "nodes" / "institution-0.key")
    code = node.process.wait(timeout=60)

    # Assert
    assert code == 1
    log = node.log_path.read_text()
    assert "does not vouch for" in log and "get the federation's ca.crt from the coordinator" in log
    assert "Starting Flower SuperNode" not in log


def hostile_app(folder: Path, marker: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "pyproject.toml").write_text(HOSTILE_PYPROJECT)
    (folder / "hostile_client.py").write_text(HOSTILE_CLIENT.format(marker=str(marker)))
    (folder / "hostile_server.py").write_text(HOSTILE_SERVER.format(nodes=len(INSTITUTIONS)))
    return folder


def test_an_unapproved_app_is_refused_by_every_node_before_its_code_runs(federation: LocalFederation,
                                                                          tmp_path: Path) -> None:
    # Prepare: an app nobody approved, whose client module leaves a marker when imported
    marker = tmp_path / "hostile-client-imported"
    app = hostile_app(tmp_path / "hostile", marker)
    assert fab_hash(app_fab(app)) != federation.app_hash
    answers_file = tmp_path / "answers.json"

    # Execute: the coordinator (or anyone reaching the Control API) submits it with `flwr run`
    _, status = federation.run({"result-file": str(answers_file)}, timeout_s=300, app=app)

    # Assert: every node answered with a refusal; the client module was never imported, nor unpacked
    assert status == "finished:completed", (federation.work / "superlink.log").read_text()[-3000:]
    answers = json.loads(answers_file.read_text())
    assert len(answers) == len(INSTITUTIONS)
    for reason in answers.values():
        assert "refused: app not approved by this institution" in reason
        assert str(federation.work) not in reason  # no local path travels to the coordinator
    assert not marker.exists()
    for name in INSTITUTIONS:
        installed = [p.name for p in (federation.site(name) / "flwr-home").rglob("*") if "hostile" in p.name]
        assert installed == [], f"{name} unpacked the unapproved app: {installed}"
        assert "not approved by this institution" in federation.nodes[name].log_path.read_text()


def test_a_node_killed_mid_round_is_skipped(federation: LocalFederation) -> None:
    # Execute: kill institution-2's SuperNode (and its ClientApp) as soon as round 1 opens
    run_id = federation.submit(settings(federation, "node-killed", **{"num-server-rounds": 2, "round-timeout": 40.0}))
    ledger = run_dir(federation, "node-killed") / "ledger.jsonl"
    _wait_for(lambda: ledger.exists() and '"round-opened"' in ledger.read_text(), 120)
    federation.kill_node("institution-2")
    status = federation.wait(run_id, timeout_s=300)

    # Assert: round 1 completed with the two others and recorded the silent node; round 2 ran
    assert status == "finished:completed"
    results = json.loads((run_dir(federation, "node-killed") / "results.json").read_text())
    first, second = results["rounds"]
    assert first["clients_replied"] == 2 and second["clients_replied"] == 2
    # one entry, for the killed node: the round timed out on it, or the SuperLink answered for it first
    [reason] = first["clients_rejected"].values()
    assert reason == "no reply within round-timeout=40 s" or "Node Unavailable" in reason

    # the institution restarts its node, which keeps its identity and comes back online
    federation.start_node("institution-2")
    federation.wait_for_nodes(len(INSTITUTIONS))


def test_a_killed_serverapp_resumes_at_the_next_round(federation: LocalFederation) -> None:
    # Execute: kill the ServerApp once round 1 is checkpointed, then start the run again with resume
    name = "resumed"
    run_id = federation.submit(settings(federation, name, **{"num-server-rounds": 2}))
    progress = run_dir(federation, name) / "progress.jsonl"
    _wait_for(lambda: progress.exists() and '"event": "checkpoint"' in progress.read_text(), 180)
    pids = federation.serverapp_pids()
    assert pids, "no ServerApp process found under the SuperLink"
    for pid in pids:
        os.kill(pid, 9)
    federation.wait(run_id, timeout_s=120)
    _, status = federation.run(settings(federation, name, **{"num-server-rounds": 2, "resume": True}), timeout_s=300)

    # Assert: rounds 1 and 2 exactly once, completed, one unbroken audit chain across both ServerApps
    assert status == "finished:completed"
    folder = run_dir(federation, name)
    results = json.loads((folder / "results.json").read_text())
    assert results["status"] == "completed"
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    report = verify_ledger(folder / "ledger.jsonl")
    assert report.ok, report.problems
    kinds = [json.loads(line)["kind"] for line in (folder / "ledger.jsonl").read_text().splitlines()]
    assert kinds.count("run-finished") == 1


def _wait_for(condition, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"condition not met within {timeout_s} s"
        time.sleep(0.1)


def _processes_under(work: Path) -> list[str]:
    return [cmd for pid, cmd in processes_matching(str(work)) if pid != os.getpid()]
