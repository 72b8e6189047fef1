"""The ServerApp stopped in round 2 and resumed (`resume = true`) ends exactly where an uninterrupted run does:
distillation and FedAvg, through `server_app.main` and the real ClientApp handlers of three institutions
(the suite's in-memory Grid delivers the messages), signed and logged as in a simulation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from safetensors.torch import load_file

from client import client_app
from common.audit import kinds
from common.audit.verify import verify_ledger
from common.config import default_run_config
from common.messages import SOFT_LABELS_TYPE
from server import server_app
from simulations.provision import provision_sites

from grid import MemoryGrid

NODES = (11, 12, 13)
DETERMINISTIC = ("round", "student_accuracy", "ensemble_accuracy", "clients_replied", "teacher_rounds",  # not bytes: run ids differ
                 "student_loss", "temperature")


class Killed(BaseException):
    """The ServerApp's process dies (nothing below it may catch this)."""


pytestmark = pytest.mark.usefixtures("server_task")  # Messages are made outside a Flower process (run id set per run)


@pytest.fixture(autouse=True)
def _keep_torch_rng_state():
    """build_model(seed=...) reseeds torch's global generator: restore it after each test."""
    with torch.random.fork_rng():
        yield


class Federation(MemoryGrid):
    """The in-memory Grid, each message going to the real ClientApp handler of its node, with that node's own state
    (kept across a server restart unless `restart_nodes`); `kill_at` (message type, round) stops the ServerApp as
    that message is about to go out."""

    def __init__(self, mapping: dict[str, Any], run_id: int, kill_at: tuple[str, int] | None = None) -> None:
        super().__init__(nodes=NODES)
        self.mapping, self.run_id, self.kill_at = mapping, run_id, kill_at
        self.states = {node: RecordDict() for node in NODES}

    def restart_server(self, run_id: int, *, restart_nodes: bool) -> None:
        self.run_id, self.kill_at = run_id, None
        if restart_nodes:
            self.states = {node: RecordDict() for node in NODES}

    def answer(self, message: Message) -> Message:
        kind = message.metadata.message_type
        round_ = int(message.content["config"]["server-round"]) if kind == "train" else int(message.metadata.group_id.split("-")[0])
        if self.kill_at == (kind, round_):
            raise Killed(f"killed before {kind} of round {round_}")
        node = message.metadata.dst_node_id
        context = Context(self.run_id, node, {"partition-id": NODES.index(node), "num-partitions": len(NODES)},
                          self.states[node], self.mapping)
        return client_app.HANDLERS[kind](message, context)


def settings(tmp_path: Path, name: str, **changes: Any) -> dict[str, Any]:
    folder = tmp_path / "runs" / name
    folder.mkdir(parents=True)
    return {**default_run_config(), "dataset": "digits", "public-size": 400, "num-clients": 3, "min-clients": 2,
            "partitioner": "iid", "num-server-rounds": 3, "teacher-models": "mlp", "local-epochs": 1, "student-epochs": 1,
            "output-dir": str(tmp_path / "runs"), "run-name": name, **provision_sites(folder, len(NODES)), **changes}


def run_server(grid: Federation, mapping: dict[str, Any], run_id: int) -> None:
    TaskIdentity._run_id = run_id  # restored when the test ends (the server_task fixture)
    server_app.main(grid, Context(run_id, 0, {}, RecordDict(), mapping))


def results_of(mapping: dict[str, Any]) -> dict[str, Any]:
    return json.loads((Path(mapping["output-dir"]) / mapping["run-name"] / "results.json").read_text())


def uninterrupted(tmp_path: Path, **changes: Any) -> dict[str, Any]:
    mapping = settings(tmp_path, "uninterrupted", **changes)
    run_server(Federation(mapping, 1), mapping, 1)
    return mapping


@pytest.mark.parametrize("restart_nodes", [False, True], ids=["nodes-kept", "nodes-restarted"])
@pytest.mark.parametrize("changes", [{}, {"digest-epochs": 1}], ids=["distill", "fedmd"])
def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path: Path, restart_nodes: bool, changes: dict) -> None:
    # Prepare: the same run, once straight through, once killed as round 2's query goes out
    expected = results_of(uninterrupted(tmp_path, **changes))
    mapping = settings(tmp_path, "resumed", **changes)
    grid = Federation(mapping, 100, kill_at=(SOFT_LABELS_TYPE, 2))
    with pytest.raises(Killed):
        run_server(grid, mapping, 100)
    failed = results_of(mapping)

    # Execute: a new Flower run (new run id) with resume = true; the institutions kept running, or restarted too
    grid.restart_server(200, restart_nodes=restart_nodes)
    run_server(grid, {**mapping, "resume": True}, 200)

    # Assert
    results = results_of(mapping)
    assert failed["status"] == "failed" and [r["round"] for r in failed["rounds"]] == [1]
    assert results["status"] == "completed" and set(results) == set(expected)
    assert [{k: r.get(k) for k in DETERMINISTIC} for r in results["rounds"]] == \
           [{k: r.get(k) for k in DETERMINISTIC} for r in expected["rounds"]]
    assert results["final"]["student_accuracy"] == expected["final"]["student_accuracy"]
    folder, reference = Path(mapping["output-dir"]) / "resumed", Path(mapping["output-dir"]) / "uninterrupted"
    assert all(torch.equal(v, load_file(str(reference / "student.safetensors"))[k])
               for k, v in load_file(str(folder / "student.safetensors")).items())
    entries = [json.loads(line) for line in (folder / "ledger.jsonl").read_text().splitlines()]
    [resume] = [e for e in entries if e["kind"] == kinds.RUN_RESUMED]
    assert (resume["body"]["checkpoint_round"], resume["body"]["interrupted_run_ids"], resume["body"]["run_id"]) == (1, ["100"], "200")
    logs = sorted((folder / "sites").glob("*/release-log.jsonl"))
    check = verify_ledger(folder / "ledger.jsonl", client_logs=logs)
    assert check.ok, [str(p) for p in check.problems]


def test_a_run_stopped_in_its_first_round_starts_afresh_and_abandons_that_attempt(tmp_path: Path) -> None:
    # Prepare: killed as round 1's query goes out (round-opened is in the ledger, no checkpoint yet)
    expected = results_of(uninterrupted(tmp_path))
    mapping = settings(tmp_path, "resumed")
    grid = Federation(mapping, 100, kill_at=(SOFT_LABELS_TYPE, 1))
    with pytest.raises(Killed):
        run_server(grid, mapping, 100)

    # Execute
    grid.restart_server(200, restart_nodes=True)
    run_server(grid, {**mapping, "resume": True}, 200)

    # Assert
    results = results_of(mapping)
    assert [r["student_accuracy"] for r in results["rounds"]] == [r["student_accuracy"] for r in expected["rounds"]]
    folder = Path(mapping["output-dir"]) / "resumed"
    entries = [json.loads(line) for line in (folder / "ledger.jsonl").read_text().splitlines()]
    [resume] = [e for e in entries if e["kind"] == kinds.RUN_RESUMED]
    assert (resume["body"]["checkpoint_round"], resume["body"]["abandoned_rounds"]) == (0, [1])
    assert entries[resume["body"]["checkpoint_seq"]]["kind"] == kinds.RUN_STARTED
    progress = [json.loads(line) for line in (folder / "progress.jsonl").read_text().splitlines()]
    assert "holds no checkpoint: starting the run afresh" in next(e for e in progress if e["event"] == "resume-skipped")["note"]
    check = verify_ledger(folder / "ledger.jsonl", client_logs=sorted((folder / "sites").glob("*/release-log.jsonl")))
    assert check.ok, [str(p) for p in check.problems]


def test_fedavg_resumes_too(tmp_path: Path) -> None:
    # Prepare
    expected = results_of(uninterrupted(tmp_path, method="fedavg"))
    mapping = settings(tmp_path, "resumed", method="fedavg")
    grid = Federation(mapping, 100, kill_at=("train", 3))
    with pytest.raises(Killed):
        run_server(grid, mapping, 100)

    # Execute
    grid.restart_server(200, restart_nodes=True)
    run_server(grid, {**mapping, "resume": True}, 200)

    # Assert: rounds 1-2 from the first run, round 3 by the second, the same weights as a straight run
    results = results_of(mapping)
    assert results["status"] == "completed" and [r["round"] for r in results["rounds"]] == [1, 2, 3]
    assert [r["student_accuracy"] for r in results["rounds"]] == [r["student_accuracy"] for r in expected["rounds"]]
    folder = Path(mapping["output-dir"]) / "resumed"
    resumed = load_file(str(folder / "student.safetensors"))
    reference = load_file(str(Path(mapping["output-dir"]) / "uninterrupted" / "student.safetensors"))
    assert resumed.keys() == reference.keys() and all(torch.equal(resumed[k], reference[k]) for k in reference)
    assert verify_ledger(folder / "ledger.jsonl").ok


def test_resume_of_a_completed_run_rewrites_nothing(tmp_path: Path) -> None:
    # Prepare
    mapping = uninterrupted(tmp_path)
    folder = Path(mapping["output-dir"]) / mapping["run-name"]
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}

    # Execute
    run_server(Federation(mapping, 2), {**mapping, "resume": True}, 2)

    # Assert
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before
