"""`fedstill audit bundle` and `fedstill audit verify BUNDLE`: one file that verifies anywhere, and finds what was
changed in it (the ledger cut back, an entry altered), from the ledger and the release logs it carries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from common.audit.bundle import BUNDLE_KIND, is_bundle, unpack
from common.errors import ConfigError
from simulations.cli.main import app

from audit_fixtures import AuditedRun, audited_run


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> AuditedRun:
    return audited_run(tmp_path_factory.mktemp("recorded"))


def make_bundle(run: AuditedRun, out: Path) -> Path:
    logs = [arg for log in run.client_logs for arg in ("--client-log", str(log))]
    result = CliRunner().invoke(app, ["audit", "bundle", str(run.folder), *logs, "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def verify(bundle: Path, *extra: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["audit", "verify", str(bundle), *extra])
    return result.exit_code, result.output


def test_a_bundle_verifies_anywhere(recorded: AuditedRun, tmp_path: Path) -> None:
    # Prepare: the bundle, then the run folder out of reach
    bundle = make_bundle(recorded.copy_to(tmp_path / "copy"), tmp_path / "bundle.json")
    pub = tmp_path / "coordinator.pub"
    pub.write_text(recorded.coordinator_key)

    # Execute
    code, output = verify(bundle, "--coordinator-key", str(pub))

    # Assert
    assert code == 0, output
    assert "2 release log(s)" in output and "cosigned by ['institution-0', 'institution-1']" in output
    assert json.loads(bundle.read_text())["kind"] == BUNDLE_KIND and is_bundle(bundle)
    assert not is_bundle(recorded.ledger)


def test_a_bundle_whose_ledger_was_cut_back_fails_on_the_receipts_it_carries(recorded: AuditedRun, tmp_path: Path) -> None:
    # Prepare: the ledger cut right after run-finished, re-bundled (the coordinator's copy of events)
    bundle = make_bundle(recorded.copy_to(tmp_path / "copy"), tmp_path / "bundle.json")
    data = json.loads(bundle.read_text())
    data["ledger"] = "".join(data["ledger"].splitlines(keepends=True)[:13])
    data["results_audit"] = None
    bundle.write_text(json.dumps(data))

    # Execute
    code, output = verify(bundle)

    # Assert
    assert code == 1
    assert "witness: no tree head covers the closing entry" in output
    assert "truncation: 'institution-0' cosigned this ledger at 14 entries; it has 13" in output


def test_a_file_that_is_no_bundle_is_named(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text('{"kind": "other"}')
    with pytest.raises(ConfigError, match="is not an audit bundle of kind fedstill/audit-bundle/v1"):
        unpack(tmp_path / "x.json", tmp_path / "out")
    code, output = verify(tmp_path / "x.json")
    assert code != 0
