"""The node's runner runs each ClientApp task in a process forked from a warm task server, which preloads installed
libraries only, and logs where each task's time went; the SuperNode polls at the interval `fedstill supernode` sets."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from flwr.app import ConfigRecord, Context, RecordDict

from simulations.deploy import runner, supernode_poll
from simulations.deploy.approved_apps import ApprovedApps, fab_hash

APP = b"PK\x03\x04 pretend this is an app bundle"
APP_PACKAGES = ("client", "server", "common")  # what an app bundle brings: imported only after its approval


def test_the_task_server_preloads_installed_libraries_never_an_apps_own_code() -> None:
    roots = {name.split(".")[0] for name in runner.PRELOAD}
    assert {"torch", "flwr", "numpy"} <= roots and not roots & set(APP_PACKAGES)
    assert runner.PRELOAD[-1] == "simulations.deploy.frozen_preload"  # frozen after the others imported


def test_a_task_logs_each_step_in_flowers_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    # Prepare: Flower's ClientApp process module with its network steps replaced, in Flower's order
    module = runner._flower_clientapp_module()
    state = RecordDict({"teacher-meta": ConfigRecord({"model": "mlp", "rounds-trained": 2})})
    context = Context(run_id=1, node_id=2, node_config={}, state=state, run_config={})
    ApprovedApps(frozenset({fab_hash(APP)})).write(tmp_path / "approved-apps.toml")

    def pull_task_input(client: Any) -> Any:
        return "message", context, "run", SimpleNamespace(hash_str=fab_hash(APP), content=APP)

    def run_clientapp(**kwargs: Any) -> None:
        _, pulled, _, fab = module.pull_task_input(None)
        module.install_from_fab(fab.content, skip_prompt=True)
        app = module.get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)("id", "1.0", fab.hash_str)
        time.sleep(0.05)  # the ClientApp runs
        module.push_message(None, app, pulled)

    monkeypatch.setattr(module, "pull_task_input", pull_task_input)
    monkeypatch.setattr(module, "install_from_fab", lambda content, skip_prompt=False: None)
    monkeypatch.setattr(module, "get_load_client_app_fn", lambda **kwargs: lambda *args: "app")
    monkeypatch.setattr(module, "push_message", lambda client, message, pulled: None)
    monkeypatch.setattr(module, "run_clientapp", run_clientapp)
    pull_parts = module.pull_and_inflate_object_from_tree
    monkeypatch.setattr(module, "pull_and_inflate_object_from_tree", pull_parts)  # the runner wraps it: restored after

    # Execute
    with caplog.at_level(logging.INFO, logger="fedstill.runner"):
        runner.run_approved_clientapp("127.0.0.1:1", "token", tmp_path / "approved-apps.toml", None, taken=time.time() - 1)

    # Assert: one line, the steps in order, each with its own duration, and the size of the node state received
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ClientApp task:")]
    steps = ["started", "connected", "inputs pulled", "bundle checked and installed", "app loaded", "ClientApp ran", "reply pushed"]
    assert [part.split(" ")[0] for part in line.removeprefix("ClientApp task: ").split(", ")][:7] == [s.split(" ")[0] for s in steps]
    assert line.index("started") < line.index("inputs pulled") < line.index("app loaded") < line.index("reply pushed")
    assert float(line.split("started ")[1].split(" s")[0]) >= 1.0  # taken a second before the process started
    assert float(line.split("ClientApp ran ")[1].split(" s")[0]) >= 0.05
    assert f"(node state {runner._state_bytes(context) / 1e3:.1f} kB)" in line and runner._state_bytes(context) > 0
    # a part of the message its SuperNode is still receiving is asked for again after 0.05 s, not Flower's 1 s
    assert module.pull_and_inflate_object_from_tree.func is pull_parts
    assert module.pull_and_inflate_object_from_tree.keywords == {"initial_backoff": runner.OBJECT_RETRY_S}


def test_the_supernode_loop_polls_at_the_interval_given(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    from flwr.supernode import start_client_internal as loop

    monkeypatch.setattr(loop, "time", time)  # both restored after the test
    monkeypatch.setattr(loop, "pull_objects", loop.pull_objects)

    # Execute
    shortened = supernode_poll.shorten_polls(0.5)
    started = time.monotonic()
    loop.time.sleep(0.6)  # a sleep of Flower's loop
    slept = time.monotonic() - started

    # Assert: each sleep of Flower's loop scaled by 0.5 / 3 (its 3 s poll becomes 0.5 s); the rest of `time` as it was
    assert shortened and isinstance(loop.time, supernode_poll.ScaledSleep)
    assert loop.time.factor == pytest.approx(0.5 / 3) and 0.1 <= slept < 0.5
    assert loop.time.monotonic is time.monotonic
    assert loop.pull_objects.keywords == {"initial_backoff": pytest.approx(0.1)}  # a part the SuperLink lacks: 0.1 s, not 1 s


def test_a_loop_module_that_changed_keeps_flowers_intervals(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supernode import start_client_internal as loop

    monkeypatch.setattr(loop, "time", SimpleNamespace(sleep=time.sleep))  # not the `time` module any more
    assert not supernode_poll.shorten_polls(0.5) and isinstance(loop.time, SimpleNamespace)


def test_the_supernode_process_refuses_an_interval_out_of_range(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        supernode_poll.main(["--poll-interval", "0", "--", "--insecure"])
    assert "--poll-interval must be in (0, 3] seconds" in capsys.readouterr().err


@pytest.mark.parametrize("approved", [True, False])
def test_a_bundle_installed_at_an_earlier_task_is_not_unpacked_again_once_approved(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, approved: bool,
) -> None:
    # Prepare: the folder Flower installed the bundle into at an earlier task
    from flwr.common.config import get_project_dir

    from simulations.deploy.approved_apps import AppNotApproved

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    folder = get_project_dir("fedstill/fedstill", "0.1.0", fab_hash(APP))
    folder.mkdir(parents=True)
    (folder / "pyproject.toml").write_text("[project]\n")
    ApprovedApps(frozenset({fab_hash(APP) if approved else "0" * 64})).write(tmp_path / "approved-apps.toml")
    module, ran = runner._flower_clientapp_module(), []
    run = SimpleNamespace(fab_id="fedstill/fedstill", fab_version="0.1.0")
    monkeypatch.setattr(module, "pull_task_input", lambda client: ("message", "context", run,
                                                                   SimpleNamespace(hash_str=fab_hash(APP), content=APP)))
    monkeypatch.setattr(module, "install_from_fab", lambda content, skip_prompt=False: ran.append("unpacked"))

    def run_clientapp(**kwargs: Any) -> None:
        fab = module.pull_task_input(None)[3]
        try:
            ran.append(module.install_from_fab(fab.content, skip_prompt=True))
        except AppNotApproved:
            ran.append("refused")

    monkeypatch.setattr(module, "run_clientapp", run_clientapp)
    for name in ("pull_and_inflate_object_from_tree", "get_load_client_app_fn", "push_message"):  # the runner wraps them
        monkeypatch.setattr(module, name, getattr(module, name))

    # Execute
    runner.run_approved_clientapp("127.0.0.1:1", "token", tmp_path / "approved-apps.toml", None)

    # Assert: the approval first, always; then Flower's folder as its install would return it
    assert ran == ([folder] if approved else ["refused"])
