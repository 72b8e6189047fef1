"""Privacy settings: the run config's checks, an institution's own budget, and the results' privacy section."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import RecordDict

from client.node_state import pate_rounds
from client.privacy import Policy, dpsgd_round, load_policy, pate_round, statement
from client.site import Site
from common.audit import kinds
from common.config import RunConfig
from common.errors import ConfigError, PrivacyBudgetExceeded
from common.models.registry import build_model
from common.node_config import NodeConfig
from common.privacy.budget import PrivacyLedger
from common.tasks.registry import load_split
from common.tasks.samples import public_fingerprint
from server.exchange import node_error_check, short_reason
from server.results.privacy import privacy_section


def config(mapping: dict[str, Any], **overrides: Any) -> RunConfig:
    return RunConfig.from_run_config({**mapping, **overrides})


@pytest.mark.parametrize(("overrides", "message"), [
    ({"privacy": "laplace"}, "privacy must be one of"),
    ({"privacy": "dp-sgd", "revisit-epochs": 1}, "revisit-epochs > 0 trains the teacher on private data"),
    ({"privacy": "pate", "method": "fedavg"}, "the FedAvg baseline"),
    ({"privacy": "dp-sgd", "local-epochs": 0}, "local-epochs must be >= 1"),
    ({"dp-noise-multiplier": -1.0}, "dp-noise-multiplier must be >= 0"),
    ({"dp-max-grad-norm": 0.0}, "dp-max-grad-norm must be > 0"),
    ({"pate-teachers": 1}, "pate-teachers must be >= 2"),
    ({"pate-queries": 0}, "pate-queries must be >= 1"),
])
def test_bad_privacy_settings_are_refused_with_the_fix(run_config_mapping: dict, overrides: dict, message: str) -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match=message):
        config(run_config_mapping, **overrides)


def test_the_budget_comes_from_the_site_and_the_node_config_wins(tmp_path: Path, run_config_mapping: dict) -> None:
    # Prepare
    cfg = config(run_config_mapping, **{"sites-dir": str(tmp_path)})
    site = tmp_path / "institution-3"
    site.mkdir()
    (site / "site.toml").write_text("max-epsilon = 4.0\ndelta = 1e-6\n")

    # Execute
    from_site = load_policy(cfg, NodeConfig(partition_id=3))
    from_node = load_policy(cfg, NodeConfig(partition_id=3, max_epsilon=2.0))

    # Assert
    assert (from_site.max_epsilon, from_site.delta, from_site.ledger_path) == (4.0, 1e-6, site / "privacy-ledger.json")
    assert from_node.max_epsilon == 2.0


def test_a_node_without_a_ledger_or_with_a_bad_budget_is_told_how(tmp_path: Path, run_config_mapping: dict) -> None:
    # Prepare
    cfg = config(run_config_mapping)

    # Execute / Assert
    with pytest.raises(ConfigError, match="privacy-ledger="):
        load_policy(cfg, NodeConfig(partition_id=0))
    with pytest.raises(ConfigError, match="max-epsilon must be a number > 0"):
        NodeConfig.from_node_config({"privacy-ledger": str(tmp_path / "l.json"), "max-epsilon": -1.0})
    with pytest.raises(ConfigError, match="delta must be a float in"):
        NodeConfig.from_node_config({"privacy-ledger": str(tmp_path / "l.json"), "delta": 2.0})
    unlimited = load_policy(cfg, NodeConfig(privacy_ledger=str(tmp_path / "l.json")))
    assert math.isinf(unlimited.max_epsilon) and unlimited.delta == 1e-5


def entry(kind: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"kind": kind, "body": body}


def accepted(round_: int, node: str, institution: str, eps: float, total: float) -> dict[str, Any]:
    privacy = statement("dp-sgd", {"noise_multiplier": 1.1}, total - eps, total, 1e-5)
    text = json.dumps({"institution_id": institution, "privacy": privacy})
    return entry(kinds.REPLY_ACCEPTED, {"round": round_, "phase": "soft-labels", "node_id": node,
                                         "institution_id": institution, "attestation": {"statement": text, "signature": "x"}})


def test_the_privacy_section_reads_what_institutions_signed(run_config_mapping: dict) -> None:
    # Prepare
    cfg = config(run_config_mapping, privacy="dp-sgd")
    entries = [
        accepted(1, "11", "hospital-a", 1.5, 1.5), accepted(1, "12", "bank-b", 1.5, 1.5),
        accepted(2, "11", "hospital-a", 0.5, 2.0),
        entry(kinds.REPLY_REJECTED, {"round": 2, "phase": "soft-labels", "node_id": "12", "institution_id": None,
                                     "check": "privacy-budget", "reason": "node error: PrivacyBudgetExceeded: ..."}),
    ]

    # Execute
    section = privacy_section(cfg, entries)

    # Assert
    assert section["mechanism"] == "dp-sgd" and section["delta"] == [1e-5]
    assert section["epsilon_final"] == {"hospital-a": 2.0, "bank-b": 1.5} and section["epsilon_max"] == 2.0
    assert [sorted(r["institutions"]) for r in section["epsilon_per_round"]] == [["bank-b", "hospital-a"], ["hospital-a"]]
    assert section["refusals"] == [{"round": 2, "phase": "soft-labels", "check": "privacy-budget", "node_id": "12",
                                    "institution_id": "bank-b", "institution_from": "attestation",
                                    "reason": "node error: PrivacyBudgetExceeded: ..."}]
    assert section["guarantee"] == "differential privacy"


def test_node_errors_are_one_readable_line_and_refusals_are_named() -> None:
    # Prepare
    engine = ("<class 'ray.exceptions.RayTaskError(ClientAppException)'>: Traceback ...\n  File x\n"
              "common.errors.PrivacyBudgetExceeded: ...\nException ClientAppException occurred. Message: "
              "round 2: 200 PATE answers refused: spent 14.1'>)")

    # Execute / Assert
    assert short_reason(engine) == "round 2: 200 PATE answers refused: spent 14.1"
    assert node_error_check(engine) == "privacy-budget"
    assert node_error_check("KeyError: 'x'") == "node-error"
    assert len(short_reason("y" * 5000)) == 600


# --- spending the budget (client/privacy.py): atomic, and no local path in what reaches the server ------


@pytest.fixture(scope="module")
def site() -> Site:
    split = load_split("digits", "", 400, 42)
    return Site(partition_id=1, private=split.private.subset(np.arange(120)), public=split.public, test=split.test,
                fingerprint=public_fingerprint(split.public))


def dp_config(run_config_mapping: dict, **overrides: Any) -> RunConfig:
    return config(run_config_mapping, **{"dataset": "digits", "public-size": 400, "teacher-models": "mlp",
                                         "local-epochs": 1, "teacher-batch-size": 32, **overrides})


def ledger_entries(policy: Policy) -> list[dict[str, Any]]:
    return json.loads(policy.ledger_path.read_text())["entries"]


def test_a_dp_sgd_refusal_names_epsilons_and_logs_the_ledger_path_only_on_the_node(
    tmp_path: Path, site: Site, run_config_mapping: dict, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: a budget far below one round of DP-SGD, and a teacher that has not trained yet
    cfg = dp_config(run_config_mapping, privacy="dp-sgd", **{"dp-noise-multiplier": 0.5})
    policy = Policy(max_epsilon=0.01, delta=1e-5, ledger_path=tmp_path / "secret-site" / "privacy-ledger.json")
    teacher = build_model("mlp", 10, (8, 8), seed=0)

    # Execute
    with caplog.at_level(logging.WARNING, logger="flwr"), pytest.raises(PrivacyBudgetExceeded) as caught:
        dpsgd_round(teacher, cfg, site, policy, run_id=7, round_=1, rounds_trained=0)

    # Assert: the reply's text has the numbers and the fix, not the path; the node's log has the path
    message = str(caught.value)
    assert "round 1: DP-SGD training refused" in message and "max-epsilon 0.01" in message
    assert "secret-site" not in message and str(tmp_path) not in message
    assert str(policy.ledger_path) in caplog.text
    assert ledger_entries(policy) == []


def test_a_dp_sgd_round_trains_under_the_lock_and_records_its_spend(
    tmp_path: Path, site: Site, run_config_mapping: dict
) -> None:
    # Prepare
    cfg = dp_config(run_config_mapping, privacy="dp-sgd", **{"dp-noise-multiplier": 1.0})
    policy = Policy(max_epsilon=50.0, delta=1e-5, ledger_path=tmp_path / "privacy-ledger.json")
    teacher = build_model("mlp", 10, (8, 8), seed=0)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}

    # Execute
    loss, stated = dpsgd_round(teacher, cfg, site, policy, run_id=7, round_=1, rounds_trained=0)

    # Assert: trained, recorded once, and the statement's total is the ledger's
    entries = ledger_entries(policy)
    assert math.isfinite(loss) and not all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert [(e["run_id"], e["round"], e["event"]["mechanism"]) for e in entries] == [("7", 1, "dp-sgd")]
    assert stated["epsilon_total"] == pytest.approx(entries[0]["epsilon_after"]) and stated["epsilon"] > 0
    assert PrivacyLedger.open(policy.ledger_path, 50.0, 1e-5).lock_path.exists()


def test_a_trained_dp_teacher_freezes_when_the_budget_cannot_pay_another_round(
    tmp_path: Path, site: Site, run_config_mapping: dict
) -> None:
    # Prepare
    cfg = dp_config(run_config_mapping, privacy="dp-sgd", **{"dp-noise-multiplier": 0.5})
    policy = Policy(max_epsilon=0.01, delta=1e-5, ledger_path=tmp_path / "privacy-ledger.json")
    teacher = build_model("mlp", 10, (8, 8), seed=0)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}

    # Execute
    loss, stated = dpsgd_round(teacher, cfg, site, policy, run_id=7, round_=3, rounds_trained=2)

    # Assert: nothing trained, nothing spent, and the statement says so
    assert math.isnan(loss) and stated["parameters"]["frozen"] is True and stated["epsilon"] == 0.0
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert ledger_entries(policy) == []


def test_pate_refuses_before_training_any_sub_teacher_and_keeps_the_path_local(
    tmp_path: Path, site: Site, run_config_mapping: dict
) -> None:
    # Prepare
    cfg = dp_config(run_config_mapping, privacy="pate", **{"pate-sigma": 1.0, "pate-teachers": 2})
    policy = Policy(max_epsilon=0.01, delta=1e-5, ledger_path=tmp_path / "secret-site" / "privacy-ledger.json")
    state = RecordDict()

    # Execute
    with pytest.raises(PrivacyBudgetExceeded) as caught:
        pate_round(state, cfg, site, policy, np.arange(50), run_id=7, round_=1)

    # Assert
    assert "round 1: 50 PATE answers refused" in str(caught.value) and "secret-site" not in str(caught.value)
    assert pate_rounds(state) == 0 and ledger_entries(policy) == []
