"""An institution's approved-apps list and the runner's check: a bundle not listed is refused before
Flower unpacks it; a listed one goes on to Flower's own install and load."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from common.errors import ConfigError
from simulations.deploy import approved_apps, runner
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
    # Prepare
    tiny_app(tmp_path)

    # Execute
    first, again = fab_hash(app_fab(tmp_path)), fab_hash(app_fab(tmp_path))
    (tmp_path / "c.py").write_text("app = None  # edited\n")

    # Assert
    assert first == again != fab_hash(app_fab(tmp_path))


def tiny_app(folder: Path) -> Path:
    """A minimal Flower app folder."""
    (folder / "pyproject.toml").write_text(
        '[project]\nname = "tiny"\nversion = "1.0.0"\n\n[tool.flwr.app]\npublisher = "lab"\n\n'
        '[tool.flwr.app.components]\nserverapp = "s:app"\nclientapp = "c:app"\n\n[tool.flwr.app.config]\nk = 1\n')
    (folder / "c.py").write_text("app = None\n")
    return folder


# Adding a hash to the list (`fedstill app-hash --approve`)


def test_approve_creates_the_list_then_adds_each_hash_once(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "site" / "approved-apps.toml"

    # Execute
    first = approved_apps.approve(path, fab_hash(APP), note="tiny, approved 2026-01-01")
    text_after_first = path.read_text()
    again = approved_apps.approve(path, fab_hash(APP).upper())
    second = approved_apps.approve(path, fab_hash(OTHER))

    # Assert
    assert (first, again, second) == (True, False, True)
    assert f'"{fab_hash(APP)}",  # tiny, approved 2026-01-01' in text_after_first
    assert ApprovedApps.load(path).sha256 == {fab_hash(APP), fab_hash(OTHER)}
    assert path.read_text().count(fab_hash(APP)) == 1


def test_approve_keeps_the_institutions_comments(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "approved-apps.toml"
    path.write_text(f'# our list, kept by the ethics board\nsha256 = ["{fab_hash(APP)}"]  # reviewed by Alice\n')

    # Execute
    added = approved_apps.approve(path, fab_hash(OTHER))

    # Assert
    assert added
    assert "# our list, kept by the ethics board" in path.read_text() and "# reviewed by Alice" in path.read_text()
    assert ApprovedApps.load(path).sha256 == {fab_hash(APP), fab_hash(OTHER)}


@pytest.mark.parametrize("text", ["", "# nothing approved yet\n", "sha256 = []\n"])
def test_approve_fills_a_list_that_approves_nothing_yet(tmp_path: Path, text: str) -> None:
    # Prepare
    path = tmp_path / "approved-apps.toml"
    path.write_text(text)

    # Execute
    approved_apps.approve(path, fab_hash(APP))

    # Assert
    assert ApprovedApps.load(path).sha256 == {fab_hash(APP)}
    assert path.read_text().startswith(text.partition("[")[0])


@pytest.mark.parametrize(("text", "digest", "expected"), [
    (None, "abc", "is not a FAB hash"),
    ("sha256 = [", "0" * 64, "not valid TOML"),
    ('sha256 = ["' + "0" * 64 + '"]\nallow-all = true', "1" * 64, "unknown keys"),
])
def test_approve_refuses_a_bad_hash_or_list_and_changes_nothing(tmp_path: Path, text: str | None, digest: str,
                                                                expected: str) -> None:
    # Prepare
    path = tmp_path / "approved-apps.toml"
    if text is not None:
        path.write_text(text)

    # Execute / Assert
    with pytest.raises(ConfigError, match=expected):
        approved_apps.approve(path, digest)
    assert (path.read_text() if text is not None else None) == text


def test_the_cli_prints_the_hash_and_approves_it_once(tmp_path: Path) -> None:
    from simulations.cli.main import app

    # Prepare
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    tiny_app(app_dir)
    path = tmp_path / "site" / "approved-apps.toml"  # outside the app: a .toml in it would change its bundle
    digest = fab_hash(app_fab(app_dir))

    # Execute
    first = CliRunner().invoke(app, ["app-hash", str(app_dir), "--approve", str(path)])
    again = CliRunner().invoke(app, ["app-hash", str(app_dir), "--approve", str(path)])
    plain = CliRunner().invoke(app, ["app-hash", str(app_dir)])

    # Assert
    assert first.exit_code == again.exit_code == plain.exit_code == 0, first.output + again.output
    assert first.output == f"{digest}\nadded it to {path}\n"
    assert again.output == f"{digest}\n{path} approves it already; nothing changed\n"
    assert plain.output == f"{digest}\n"
    assert ApprovedApps.load(path).sha256 == {digest} and path.read_text().count(digest) == 1


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
    for name in ("pull_and_inflate_object_from_tree", "get_load_client_app_fn", "push_message"):  # the runner wraps them
        monkeypatch.setattr(module, name, getattr(module, name))
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


def test_the_cli_refuses_a_list_inside_the_app_it_would_change(tmp_path: Path) -> None:
    from simulations.cli.main import app

    # Prepare
    app_dir = tiny_app(tmp_path)

    # Execute
    result = CliRunner().invoke(app, ["app-hash", str(app_dir), "--approve", str(app_dir / "approved-apps.toml")])

    # Assert
    assert result.exit_code == 1 and result.output.startswith("ConfigError: --approve ")
    assert "keep the approved-apps file outside the app folder" in result.output
    assert not (app_dir / "approved-apps.toml").exists()
