"""What an institution's node keeps on disk is its own only: the release log, the privacy ledger (and its lock) and
the teacher in its state folder are created owner-only (0600), in folders the node makes 0700, whatever the umask.
Three institutions laid out as `fedstill institution-init` lays one out, each node config naming its own paths,
answer a real run (the real ClientApp handlers behind the suite's in-memory Grid)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from common.audit.keys import Signer, write_key_pair
from common.config import default_run_config

from run_fixtures import NODES, Federation, loose_modes, run_server

pytestmark = pytest.mark.usefixtures("server_task")


@pytest.fixture(autouse=True)
def _keep_torch_rng_state():
    """build_model(seed=...) reseeds torch's global generator: restore it after each test."""
    with torch.random.fork_rng():
        yield


def institution(home: Path, name: str, partition_id: int) -> dict[str, Any]:
    """An institution's signing key in `home/keys` and its node config; the folders of its records are not made yet."""
    key, _ = write_key_pair(Signer.generate(name), home / "keys")
    return {"institution-id": name, "signing-key": str(key), "release-log": str(home / "records" / "release-log.jsonl"),
            "privacy-ledger": str(home / "records" / "privacy-ledger.json"), "state-dir": str(home / "state"),
            "max-epsilon": 50.0, "partition-id": partition_id, "num-partitions": len(NODES)}


@pytest.mark.usefixtures("loose_umask")
def test_a_nodes_records_and_state_are_owner_only(tmp_path: Path) -> None:
    # Prepare
    homes = {node: tmp_path / f"hospital-{i}" for i, node in enumerate(NODES)}
    node_configs = {node: institution(home, home.name, i) for i, (node, home) in enumerate(homes.items())}
    mapping = {**default_run_config(), "dataset": "digits", "public-size": 400, "num-clients": 3, "min-clients": 2,
               "partitioner": "iid", "num-server-rounds": 1, "teacher-models": "mlp", "local-epochs": 1,
               "student-epochs": 1, "privacy": "dp-sgd", "dp-noise-multiplier": 1.0, "output-dir": str(tmp_path / "runs"),
               "run-name": "coordinator"}

    # Execute
    run_server(Federation(mapping, 1, node_configs=node_configs), mapping, 1)

    # Assert: each node kept its records and its teacher, all of it its owner's only
    for home in homes.values():
        names = {path.relative_to(home).as_posix() for path in home.rglob("*")}
        assert {"records/release-log.jsonl", "records/privacy-ledger.json", "records/privacy-ledger.json.lock",
                f"keys/{home.name}.key", f"keys/{home.name}.pub"} <= names
        assert any(name.startswith("state/teacher-") for name in names)
        assert loose_modes(home) == {}
