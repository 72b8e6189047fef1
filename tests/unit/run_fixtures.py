"""Tiny finished run folders (digits 8x8 images; BBC News at 32 tokens) for the export, evaluation and bench tests,
and tiny real runs: `server_app.main` with the real ClientApp handlers of three institutions behind the suite's
in-memory Grid (`Federation`), provisioned in the run folder as `fedstill simulate` does."""

from __future__ import annotations

import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from safetensors.torch import save_file

from client import client_app
from common.config import RunConfig, default_run_config
from common.models.inputs import input_shape
from common.models.registry import build_model, count_parameters
from common.models.training import train_supervised
from common.tasks.registry import load_split
from server import server_app
from server.results.figures import final_figures, run_title, student_meta
from server.results.run_folder import RESULTS, STUDENT, STUDENT_CONFIG, write_json
from server.results.schema import RoundRow
from simulations.provision import provision_sites

from grid import MemoryGrid

TINY_RUN = {"dataset": "digits", "public-size": 400, "num-clients": 2, "min-clients": 1, "partitioner": "iid",
            "num-server-rounds": 2, "local-epochs": 1, "teacher-models": "cnn-small,mlp", "student-model": "cnn-student"}


def tiny_cfg(**overrides: Any) -> RunConfig:
    return RunConfig.from_run_config({**default_run_config(), **TINY_RUN, **overrides})


TINY_TEXT_RUN = {"dataset": "bbc-news", "public-size": 600, "max-seq-len": 32, "teacher-models": "bert-tiny",
                 "student-model": "bert-tiny", "temperature": 2.0}


def make_run_folder(path: Path, epochs: int = 8, lr: float = 0.01, **overrides: Any) -> Path:
    """A run folder as `fedstill simulate` leaves it: the student (trained on the labelled public set, which
    stands in for distillation), student.json and results.json with the scenario and rounds."""
    cfg = tiny_cfg(**overrides)
    split = load_split(cfg.dataset, cfg.data_dir, cfg.public_size, cfg.seed, cfg.test_size, max_seq_len=cfg.max_seq_len)
    shape, classes = input_shape(split.public.inputs), split.public.num_classes
    model = build_model(cfg.student_model, classes, shape, seed=cfg.seed)
    train_supervised(model, split.public.inputs, split.public.labels, epochs=epochs, lr=lr, batch_size=32, seed=0)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / STUDENT))
    write_json(path / STUDENT_CONFIG, student_meta(cfg, classes, shape, cfg.num_server_rounds).to_json())
    rounds = [RoundRow(round=r, temperature=cfg.temperature, student_accuracy=0.0, ensemble_accuracy=None,
                       clients_replied=0, clients_rejected={}, uplink_bytes=0, uplink_bytes_per_client={},
                       downlink_bytes=0, teacher_rounds={}, teacher_accuracy={}, teacher_params={}, wall_s=0.0)
              for r in range(1, cfg.num_server_rounds + 1)]
    final = final_figures(rounds, count_parameters(model), run_title(cfg))
    write_json(path / RESULTS, {"status": "completed", "scenario": cfg.to_dict(), "rounds": [r.to_json() for r in rounds],
                                "final": final.to_json()})
    return path


NODES = (11, 12, 13)


class Federation(MemoryGrid):
    """The in-memory Grid, each message going to the real ClientApp handler of its node, with that node's own state
    and node config (default: its partition of the pool). `interrupt(message type, round)`, when given, is called as
    the messages of an exchange are about to go out: a test ends the ServerApp there, as a crash or Flower would."""

    def __init__(self, mapping: dict[str, Any], run_id: int, interrupt: Callable[[str, int], None] | None = None,
                 node_configs: dict[int, dict[str, Any]] | None = None) -> None:
        super().__init__(nodes=NODES)
        self.mapping, self.run_id, self.interrupt = mapping, run_id, interrupt
        self.node_configs = node_configs or {node: {"partition-id": i, "num-partitions": len(NODES)}
                                             for i, node in enumerate(NODES)}
        self.states = {node: RecordDict() for node in NODES}

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        messages = list(messages)
        if self.interrupt is not None and messages:
            self.interrupt(messages[0].metadata.message_type, round_of(messages[0]))
        return super().push_messages(messages)

    def answer(self, message: Message) -> Message:
        node = message.metadata.dst_node_id
        context = Context(self.run_id, node, self.node_configs[node], self.states[node], self.mapping)
        return client_app.HANDLERS[message.metadata.message_type](message, context)


def round_of(message: Message) -> int:
    if message.metadata.message_type == "train":
        return int(message.content["config"]["server-round"])
    return int(message.metadata.group_id.split("-")[0])


def run_settings(tmp_path: Path, name: str, **changes: Any) -> dict[str, Any]:
    """The run config of a tiny run in `tmp_path/runs/<name>`, its institutions provisioned in the run folder."""
    folder = tmp_path / "runs" / name
    folder.mkdir(parents=True, exist_ok=True)
    return {**default_run_config(), "dataset": "digits", "public-size": 400, "num-clients": 3, "min-clients": 2,
            "partitioner": "iid", "num-server-rounds": 2, "teacher-models": "mlp", "local-epochs": 1, "student-epochs": 1,
            "output-dir": str(tmp_path / "runs"), "run-name": name, **provision_sites(folder, len(NODES)), **changes}


def run_server(grid: Federation, mapping: dict[str, Any], run_id: int) -> None:
    """`server_app.main` as Flower calls it, as run `run_id` (use with the `server_task` fixture, which restores it)."""
    grid.run_id = run_id
    TaskIdentity._run_id = run_id
    server_app.main(grid, Context(run_id, 0, {}, RecordDict(), mapping))


def loose_modes(root: Path) -> dict[str, str]:
    """Every file under `root` whose mode is not 0600, and every folder (`root` included) not 0700: path -> mode."""
    paths = [root, *sorted(root.rglob("*"))]
    return {str(p.relative_to(root.parent)): oct(stat.S_IMODE(p.lstat().st_mode)) for p in paths
            if stat.S_IMODE(p.lstat().st_mode) != (0o700 if p.is_dir() else 0o600)}
