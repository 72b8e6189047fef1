"""A client that restarts keeps its teacher (client/teacher.py) and its privacy ledger: the teacher on disk in
the node's state folder, restored only for the settings it was trained for, written atomically."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, RecordDict

import client.teacher as teacher_module
from client.answer import Answer, answer_query
from client.node_state import STORE_KEY, TeacherMeta, teacher_meta
from client.release import site_home
from client.site import Site
from client.teacher import (
    TeacherStore,
    attach_store,
    restore_teacher,
    save_teacher,
    saved_header,
    teacher_store,
    train_round,
)
from common.config import RunConfig, default_run_config
from common.errors import ConfigError
from common.messages import SoftLabelQuery
from common.models.inputs import inputs_to_tensor
from common.node_config import NodeConfig
from common.privacy.budget import PrivacyLedger
from common.tasks.registry import load_split
from common.tasks.samples import public_fingerprint

RUN_ID = 2**63 - 11
POOL = 300


@pytest.fixture(autouse=True)
def _keep_torch_rng_state():
    """build_model(seed=...) reseeds torch's global generator: restore it after each test."""
    with torch.random.fork_rng():
        yield


@pytest.fixture(scope="module")
def site() -> Site:
    split = load_split("digits", "", 400, 42)
    return Site(partition_id=1, private=split.private.subset(np.arange(POOL)), public=split.public, test=split.test,
                fingerprint=public_fingerprint(split.public))


def config(**changes: Any) -> RunConfig:
    return RunConfig.from_run_config({
        **default_run_config(), "dataset": "digits", "public-size": 400, "teacher-models": "mlp,cnn-tiny",
        "local-epochs": 1, "run-name": "study-1", **changes,
    })


def restarted(cfg: RunConfig, site: Site, node_config: dict[str, Any]) -> RecordDict:
    """The node state of a freshly started SuperNode: empty, then tied to its store as the ClientApp does."""
    state = RecordDict()
    attach_store(state, teacher_store(cfg, site, NodeConfig.from_node_config(node_config), RUN_ID))
    return state


def answer(cfg: RunConfig, site: Site, node_config: dict[str, Any], state: RecordDict, query: SoftLabelQuery) -> Answer:
    """The node's answer to `query`, its node config parsed as the ClientApp parses it."""
    context = Context(RUN_ID, 7, node_config, state, {})
    return answer_query(context, cfg, NodeConfig.from_node_config(node_config), site, query)


def trained(cfg: RunConfig, site: Site, state: RecordDict, rounds: int = 1) -> torch.nn.Module:
    for _ in range(rounds):
        model, done = restore_teacher(state, cfg, site)
        train_round(model, cfg, site, done)
        save_teacher(state, model, cfg, site, done + 1)
    return model


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


# ------------------------------------------------------------------------------------------------ where


def test_the_store_is_state_dir_else_the_institutions_folder_else_none(tmp_path: Path, site: Site) -> None:
    # Prepare
    simulated = config(**{"sites-dir": str(tmp_path / "sites")})
    deployed = {"institution-id": "hospital-a", "signing-key": str(tmp_path / "keys" / "hospital-a.key"),
                "release-log": str(tmp_path / "site" / "release-log.jsonl")}
    partition = NodeConfig(partition_id=1)

    # Execute / Assert
    assert teacher_store(config(), site, partition, RUN_ID) is None  # plain simulation: memory only
    assert teacher_store(simulated, site, partition, RUN_ID).folder == tmp_path / "sites" / "institution-1"
    assert teacher_store(config(), site, NodeConfig.from_node_config(deployed), RUN_ID).folder == tmp_path / "site"
    assert site_home(config(), NodeConfig.from_node_config({**deployed, "release-log": ""})) == tmp_path / "keys"
    explicit = teacher_store(simulated, site, NodeConfig(partition_id=1, state_dir=str(tmp_path / "state")), RUN_ID)
    assert explicit.folder == tmp_path / "state" and explicit.path.name.startswith("teacher-")


@pytest.mark.parametrize("state_dir", [True, False], ids=["on disk", "in node state"])
def test_a_scatter_pca_teacher_is_fitted_on_the_public_set_and_restored_with_its_projection(
    tmp_path: Path, site: Site, state_dir: bool
) -> None:
    # Prepare: a teacher fitted on this node's public set and trained two rounds
    import common.models.scattering as scattering

    cfg = config(**{"teacher-models": "scatter-pca"})
    node = {"partition-id": 1, **({"state-dir": str(tmp_path)} if state_dir else {})}
    state = restarted(cfg, site, node)
    before = trained(cfg, site, state, rounds=2)
    scattering._fitted.clear()  # a restarted process has fitted nothing

    # Execute
    model, rounds = restore_teacher(restarted(cfg, site, node) if state_dir else state, cfg, site)

    # Assert: the projection is the public set's (whitened there), trained weights and projection come back together
    assert rounds == 2 and same_weights(model, before) and bool(model.projection.fitted)
    refit = scattering.ScatterPCA(10, (8, 8))
    refit.fit_public(inputs_to_tensor(site.public.inputs))
    assert torch.allclose(refit.projection.basis, model.projection.basis, atol=1e-4)


def test_a_state_dir_that_is_not_a_path_is_refused() -> None:
    with pytest.raises(ConfigError, match="node config state-dir must be a folder path"):
        NodeConfig.from_node_config({"partition-id": 1, "state-dir": 3})


# ------------------------------------------------------------------------------------------------ restore


def test_a_restarted_node_continues_its_teacher(tmp_path: Path, site: Site) -> None:
    # Prepare: two rounds trained and saved, then the node restarts with empty state
    cfg, node = config(), {"partition-id": 1, "state-dir": str(tmp_path)}
    before = trained(cfg, site, restarted(cfg, site, node), rounds=2)

    # Execute
    state = restarted(cfg, site, node)
    model, rounds = restore_teacher(state, cfg, site)

    # Assert
    assert rounds == 2 and same_weights(model, before)
    [saved] = tmp_path.glob("teacher-*.safetensors")
    header = saved_header(saved)
    assert (header["model"], header["rounds_trained"], header["settings"]["run"]) == ("cnn-tiny", 2, "study-1")
    assert not list(tmp_path.glob(".*.tmp"))


def test_with_a_store_node_state_holds_the_teachers_meta_not_its_weights(tmp_path: Path, site: Site) -> None:
    # Prepare: what a deployed SuperNode passes into every ClientApp process and back
    cfg, node = config(), {"partition-id": 1, "state-dir": str(tmp_path)}
    state = restarted(cfg, site, node)
    before = trained(cfg, site, state, rounds=2)

    # Execute
    model, rounds = restore_teacher(state, cfg, site)

    # Assert: the weights are the file's; node state holds no array, only the teacher's meta
    assert rounds == 2 and same_weights(model, before)
    assert not any(isinstance(record, ArrayRecord) for record in state.values())
    store = teacher_store(cfg, site, NodeConfig.from_node_config(node), RUN_ID)
    assert teacher_meta(state) == TeacherMeta("cnn-tiny", 2, store.digest)


def test_a_teacher_file_gone_during_a_run_gives_a_fresh_teacher_and_says_so(tmp_path: Path, site: Site,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    # Prepare
    cfg, node = config(), {"partition-id": 1, "state-dir": str(tmp_path)}
    state = restarted(cfg, site, node)
    trained(cfg, site, state)
    [saved] = tmp_path.glob("teacher-*.safetensors")
    saved.unlink()

    # Execute
    with caplog.at_level(logging.WARNING, logger="flwr"):
        rounds = restore_teacher(state, cfg, site)[1]

    # Assert
    assert rounds == 0 and "trained 1 round(s), is gone: training a fresh teacher" in caplog.text


def test_without_a_store_the_teacher_lives_in_node_state_only(site: Site) -> None:
    # Prepare
    cfg, state = config(), RecordDict()
    attach_store(state, None)
    before = trained(cfg, site, state)

    # Execute
    model, rounds = restore_teacher(state, cfg, site)

    # Assert
    assert rounds == 1 and same_weights(model, before) and STORE_KEY not in state
    assert restore_teacher(RecordDict(), cfg, site)[1] == 0  # a restart loses it, as before


@pytest.mark.parametrize(("change", "differs"), [
    ({"run-name": "study-2"}, "run"),
    ({"teacher-models": "mlp,mlp"}, "model"),
    ({"seed": 7}, "seed"),
])
def test_a_teacher_of_other_settings_is_not_restored(tmp_path: Path, site: Site, change: dict[str, Any], differs: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    node = {"partition-id": 1, "state-dir": str(tmp_path)}
    trained(config(), site, restarted(config(), site, node))
    said: list[str] = []
    monkeypatch.setattr(teacher_module, "log", lambda level, message, *args: said.append(message % args))

    # Execute
    other = config(**change)
    state = restarted(other, site, node)
    model, rounds = restore_teacher(state, other, site)

    # Assert: a fresh teacher, a line that says why; the other run's teacher is still there
    assert rounds == 0
    assert len(said) == 1 and "trained for other settings" in said[0] and differs in said[0] and "fresh teacher" in said[0]
    assert len(list(tmp_path.glob("teacher-*.safetensors"))) == 1


def test_other_private_data_does_not_restore_the_teacher(tmp_path: Path, site: Site) -> None:
    # Prepare
    cfg, node = config(), {"partition-id": 1, "state-dir": str(tmp_path)}
    trained(cfg, site, restarted(cfg, site, node))
    other = Site(site.partition_id, site.private.subset(np.arange(POOL - 1)), site.public, site.test, site.fingerprint)

    # Execute / Assert
    assert restore_teacher(restarted(cfg, other, node), cfg, other)[1] == 0


def test_a_save_killed_before_the_rename_keeps_the_previous_teacher(tmp_path: Path, site: Site,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    cfg, node = config(), {"partition-id": 1, "state-dir": str(tmp_path)}
    state = restarted(cfg, site, node)
    first = trained(cfg, site, state)

    def killed(*args: Any) -> None:
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr("common.files.os.replace", killed)

    # Execute
    with pytest.raises(KeyboardInterrupt):
        trained(cfg, site, state)

    # Assert
    model, rounds = restore_teacher(restarted(cfg, site, node), cfg, site)
    assert rounds == 1 and same_weights(model, first)


def test_an_unreadable_teacher_file_gives_a_fresh_teacher(tmp_path: Path, site: Site, caplog: pytest.LogCaptureFixture) -> None:
    # Prepare
    cfg, node = config(), {"partition-id": 1, "state-dir": str(tmp_path)}
    store = teacher_store(cfg, site, NodeConfig.from_node_config(node), RUN_ID)
    store.path.write_bytes(b"not a safetensors file")

    # Execute
    with caplog.at_level(logging.WARNING, logger="flwr"):
        rounds = restore_teacher(restarted(cfg, site, node), cfg, site)[1]

    # Assert
    assert rounds == 0 and isinstance(store, TeacherStore)
    assert "does not match this node's settings" in caplog.text


# ------------------------------------------------------------------------------------------------ privacy


def test_a_restarted_dp_node_keeps_its_teacher_and_its_privacy_ledger(tmp_path: Path, site: Site) -> None:
    # Prepare: DP-SGD with a fixed noise multiplier; the node's own folder holds its privacy ledger and teacher
    cfg = config(privacy="dp-sgd", **{"dp-noise-multiplier": 1.0, "teacher-batch-size": 64})
    node = {"partition-id": 1, "state-dir": str(tmp_path / "state"), "privacy-ledger": str(tmp_path / "privacy-ledger.json"),
            "max-epsilon": 50.0}
    query = _query(site)

    # Execute: one round, a restart (empty node state), one more round
    first = answer(cfg, site, node, restarted(cfg, site, node), query)
    second = answer(cfg, site, node, restarted(cfg, site, node), query)

    # Assert
    assert (first.figures["teacher_rounds"], second.figures["teacher_rounds"]) == (1, 2)
    entries = json.loads((tmp_path / "privacy-ledger.json").read_text())["entries"]
    assert len(entries) == 2
    spent = PrivacyLedger.open(tmp_path / "privacy-ledger.json", 50.0, 1e-5).spent()
    assert second.privacy["epsilon_total"] == pytest.approx(spent) and spent > first.privacy["epsilon_total"] > 0


def _query(site: Site, round_: int = 1) -> SoftLabelQuery:
    return SoftLabelQuery(round=round_, fingerprint=site.fingerprint, temperature=3.0, codec="float16", num_classes=10,
                          sample_ids=np.arange(50, dtype=np.int64), evaluate_teacher=False)


def test_a_resumed_run_asking_again_for_a_trained_round_gets_the_teacher_as_it_is(tmp_path: Path, site: Site) -> None:
    # Prepare: the node trained for round 1, then the server stopped before it completed round 1
    node = {"partition-id": 1, "state-dir": str(tmp_path / "state")}
    first = answer(config(), site, node, restarted(config(), site, node), _query(site))
    resumed = config(resume=True)

    # Execute: the resumed run asks for round 1 again, then for round 2
    again = answer(resumed, site, node, restarted(resumed, site, node), _query(site))
    state = restarted(resumed, site, node)
    after = answer(resumed, site, node, state, _query(site, round_=2))

    # Assert: round 1 is answered by the same teacher, untrained; round 2 trains it once more
    assert again.figures["teacher_rounds"] == 1 and np.isnan(again.figures["train_loss"])
    np.testing.assert_array_equal(again.probs, first.probs)
    assert after.figures["teacher_rounds"] == 2 and not np.isnan(after.figures["train_loss"])


def test_a_resumed_dp_round_already_trained_spends_nothing_twice(tmp_path: Path, site: Site) -> None:
    # Prepare
    cfg = config(privacy="dp-sgd", **{"dp-noise-multiplier": 1.0, "teacher-batch-size": 64})
    node = {"partition-id": 1, "state-dir": str(tmp_path / "state"), "privacy-ledger": str(tmp_path / "privacy-ledger.json"),
            "max-epsilon": 50.0}
    first = answer(cfg, site, node, restarted(cfg, site, node), _query(site))
    resumed = config(resume=True, privacy="dp-sgd", **{"dp-noise-multiplier": 1.0, "teacher-batch-size": 64})

    # Execute
    again = answer(resumed, site, node, restarted(resumed, site, node), _query(site))

    # Assert: one ledger entry; the second release states it spent nothing and why
    entries = json.loads((tmp_path / "privacy-ledger.json").read_text())["entries"]
    assert len(entries) == 1
    assert again.privacy["epsilon"] == 0.0 and again.privacy["parameters"]["reused"] is True
    assert again.privacy["epsilon_total"] == pytest.approx(first.privacy["epsilon_total"])
