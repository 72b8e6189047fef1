"""The node runs only approved code: on a loopback deployment (TLS, node authentication), an app the
institutions did not approve is submitted with `flwr run`; every node refuses it before any of its
code runs, and the approved fedstill app then runs normally."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from common.config import RunConfig, default_run_config
from simulations.deploy.approved_apps import app_fab, fab_hash
from simulations.deploy.local import LocalFederation
from simulations.deploy.site_data import write_site_data
from simulations.launcher import processes_matching

INSTITUTIONS = ["institution-0", "institution-1"]
SCENARIO = {
    "scenario": "approved-apps", "dataset": "digits", "num-clients": 2, "min-clients": 2, "public-size": 300,
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
    work = tmp_path_factory.mktemp("approved")
    cfg = RunConfig.from_run_config({**default_run_config(), **SCENARIO})
    written, _ = write_site_data(cfg, work / "sites", fmt="idx")
    configs = {site.name: {"data-path": str(site.folder)} for site in written}
    fed = LocalFederation(work, INSTITUTIONS, node_configs=configs)
    with fed:
        yield fed
    assert all(p.poll() is not None for p in fed.started), "a started process is still running"
    # the SuperLink's detached SuperExec and the nodes' runners exit when they see their parent gone
    deadline = time.monotonic() + 15
    while _processes_under(work) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_under(work) == [], "a SuperLink, SuperNode, runner or app process outlived the federation"


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


def test_the_approved_app_then_runs_normally(federation: LocalFederation) -> None:
    # Execute
    settings = {**SCENARIO, "output-dir": str(federation.work / "runs"), "run-name": "approved",
                "num-server-rounds": 1}
    _, status = federation.run(settings, timeout_s=300)

    # Assert
    assert status == "finished:completed"
    results = json.loads((federation.work / "runs" / "approved" / "results.json").read_text())
    assert results["status"] == "completed"
    assert [r["clients_replied"] for r in results["rounds"]] == [len(INSTITUTIONS)]


def _processes_under(work: Path) -> list[str]:
    return [cmd for pid, cmd in processes_matching(str(work)) if pid != os.getpid()]
