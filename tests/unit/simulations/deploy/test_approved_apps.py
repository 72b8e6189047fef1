"""An institution's approved-apps list and the runner's check: a bundle not listed is refused before
Flower unpacks it; a listed one goes on to Flower's own install and load."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from common.errors import ConfigError
from simulations.deploy import runner
from simulations.deploy.approved_apps import AppNotApproved, ApprovedApps, app_fab, check_bundle, fab_hash

APP = b"PK\x03\x04 pretend this is an app bundle"
OTHER = b"PK\x03\x04 another app bundle"


def approve(path: Path, *contents: bytes) -> Path:
    ApprovedApps(frozenset(fab_hash(c) for c in contents)).write(path)
    return path


def test_a_written_list_reads_back(tmp_path: Path) -> None:
    path = approve(tmp_path / "approved-apps.toml", APP, OTHER)
    assert ApprovedApps.load(path).sha256 == {fab_hash(APP), fab_hash(OTHER)}


@pytest.mark.parametrize(("text", "expected"), [
    (None, "not found"),
    ("sha256 = [", "not valid TOML"),
    ("sha256 = []", "approves no app"),
    ('sha256 = ["abc"]', "not 64 hex digits"),
    ('sha256 = ["' + "0" * 64 + '"]\nallow-all = true', "unknown keys ['allow-all']"),
])
def test_a_bad_list_is_refused_with_the_fix(tmp_path: Path, text: str | None, expected: str) -> None:
    path = tmp_path / "approved-apps.toml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        ApprovedApps.load(path)


def test_check_bundle_hashes_the_bytes_and_ignores_a_claimed_hash() -> None:
    approved = ApprovedApps(frozenset({fab_hash(APP)}))
    assert check_bundle(APP, fab_hash(APP), approved) == fab_hash(APP)
    with pytest.raises(AppNotApproved, match="refused: app not approved by this institution"):
        check_bundle(OTHER, fab_hash(OTHER), approved)
    with pytest.raises(AppNotApproved, match="the run names"):  # an approved hash named for other bytes
        check_bundle(OTHER, fab_hash(APP), approved)


def test_an_app_folder_has_one_hash_and_any_edit_changes_it(tmp_path: Path) -> None:
    # Prepare: a minimal Flower app folder
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "tiny"\nversion = "1.0.0"\n\n[tool.flwr.app]\npublisher = "lab"\n\n'
        '[tool.flwr.app.components]\nserverapp = "s:app"\nclientapp = "c:app"\n\n[tool.flwr.app.config]\nk = 1\n')
    (tmp_path / "c.py").write_text("app = None\n")

    # Execute
    first, again = fab_hash(app_fab(tmp_path)), fab_hash(app_fab(tmp_path))
    (tmp_path / "c.py").write_text("app = None  # edited\n")

    # Assert
    assert first == again != fab_hash(app_fab(tmp_path))


@pytest.fixture
def flower(monkeypatch: pytest.MonkeyPatch):
    """Flower's ClientApp process module with its network steps replaced: it records what ran."""
    module = runner._flower_clientapp_module()
    ran: list[str] = []
    state = SimpleNamespace(content=APP, ran=ran)

    def pull_task_input(client):
        ran.append("pull")
        return "message", "context", "run", SimpleNamespace(hash_str=fab_hash(state.content), content=state.content)

    def install_from_fab(content, skip_prompt=False):
        ran.append("install")

    def run_clientapp(**kwargs):  # Flower's order: pull the inputs, install the bundle, then load and run it
        _, _, _, fab = module.pull_task_input(None)
        try:
            module.install_from_fab(fab.content, skip_prompt=True)
        except AppNotApproved as error:
            ran.append(f"error reply: {error}")
            return
        ran.append("load and run")

    monkeypatch.setattr(module, "pull_task_input", pull_task_input)
    monkeypatch.setattr(module, "install_from_fab", install_from_fab)
    monkeypatch.setattr(module, "run_clientapp", run_clientapp)
    return state


def test_an_unapproved_bundle_is_refused_before_install(flower, tmp_path: Path) -> None:
    # Prepare
    flower.content = OTHER
    approved = approve(tmp_path / "approved-apps.toml", APP)

    # Execute
    runner.run_approved_clientapp("127.0.0.1:1", "token", approved, None)

    # Assert
    assert flower.ran[0] == "pull" and len(flower.ran) == 2
    assert flower.ran[1].startswith("error reply: refused: app not approved by this institution")


def test_an_approved_bundle_is_installed_and_run(flower, tmp_path: Path) -> None:
    runner.run_approved_clientapp("127.0.0.1:1", "token", approve(tmp_path / "approved-apps.toml", APP), None)
    assert flower.ran == ["pull", "install", "load and run"]


def test_an_unreadable_list_refuses_without_naming_its_path(flower, tmp_path: Path) -> None:
    runner.run_approved_clientapp("127.0.0.1:1", "token", tmp_path / "missing.toml", None)
    assert flower.ran[1].startswith("error reply: refused: this node's approved-apps file could not be read")
    assert str(tmp_path) not in flower.ran[1]
