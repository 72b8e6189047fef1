"""The institution's ClientApp runner: it starts a run's ClientApp only if the app bundle is approved.

`fedstill supernode` starts `flower-supernode --isolation process`, so the SuperNode itself never
starts app code, and this runner beside it in place of Flower's SuperExec:

    python -m simulations.deploy.runner dispatch --runtime-api-address 127.0.0.1:9094 \
        --approved-apps approved-apps.toml --parent-pid <SuperNode pid>

`dispatch` asks the SuperNode's Runtime API for ClientApp tasks (and no other kind: an agent app,
a connector or a model task is never taken) and runs each task in a process of its own, as
Flower's SuperExec starts one `flwr-clientapp` per task. The task's process is Flower's own
`run_clientapp` with one step added: after it pulls the task's inputs (message, context, run,
app bundle) and before it unpacks the bundle, the bytes received are hashed and checked against
the institution's approved list (simulations/deploy/approved_apps.py). An unapproved bundle is
never written to disk or imported; the task ends with an error reply the coordinator sees
("refused: app not approved by this institution ..."). Dependencies named by an app are never
installed at run time.

Each task still gets a fresh process (nothing of one message's Python state reaches the next), but
not a fresh interpreter: the processes are forked from a server process that imported, once, the
installed libraries every ClientApp needs (`PRELOAD`: torch with the compiler front-end its optimisers
import on first use, the ONNX exporter and onnxruntime of the labelling pass, numpy, safetensors, Flower's
ClientApp runtime). Importing those cost a new
interpreter several seconds per message; a fork costs milliseconds. The server process never imports
an app bundle's own code: that is loaded in the task's process, after the approval check. Each task
logs where its time went (`TaskClock`).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import time
from dataclasses import dataclass, field
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import Any

from common.errors import ConfigError
from simulations.deploy.approved_apps import AppNotApproved, ApprovedApps, check_bundle

POLL_S = 0.2  # between two requests for a task to the node's own SuperNode (loopback)
PRELOAD = (  # installed libraries, imported once by the process the tasks are forked from; never an app's own code
    "numpy", "torch", "torch._dynamo", "torch.onnx", "onnxruntime",  # the exporter and engine of the labelling pass
    "safetensors.torch", "cryptography.hazmat.primitives.asymmetric.ed25519",
    "flwr.supernode.runtime.run_clientapp", "simulations.deploy.runner",
    "simulations.deploy.exporter_preload",  # one tiny export: the exporter's own lazy imports, done once
    "simulations.deploy.frozen_preload",  # last: gc.freeze() of what the others made
)
OBJECT_RETRY_S = 0.05  # a task's first retry of a message part its SuperNode is still receiving (Flower: 1 s)
STOP_GRACE_S = 10.0  # a running ClientApp's time to push its status when the node stops
LOG = logging.getLogger("fedstill.runner")


def _flower_clientapp_module() -> Any:
    """Flower's ClientApp process module, checked to have the two steps the approval hooks into.

    If a Flower upgrade renames them the runner stops here (fail closed) instead of running
    unchecked bundles.
    """
    from flwr.supernode.runtime import run_clientapp as module

    for name in ("pull_task_input", "install_from_fab", "run_clientapp"):
        if not callable(getattr(module, name, None)):
            raise RuntimeError(f"flwr.supernode.runtime.run_clientapp has no {name}: this Flower version is not "
                               f"the one the approval runner was written for; pin flwr to the project's version")
    return module


@dataclass
class TaskClock:
    """Where one task's time went, from the moment the runner took it (wall-clock seconds, across processes)."""

    taken: float
    marks: dict[str, float] = field(default_factory=dict)  # step -> time.time() at its end, in order
    state_bytes: int = -1  # the node state the task received (Flower passes it in and out of every task)

    def mark(self, step: str) -> None:
        self.marks[step] = time.time()

    def summary(self) -> str:
        """"started 0.05 s, inputs pulled 0.02 s (node state 1.3 kB), ..." : each step's own duration."""
        parts, before = [], self.taken
        for step, at in self.marks.items():
            size = f" (node state {self.state_bytes / 1e3:.1f} kB)" if step == "inputs pulled" and self.state_bytes >= 0 else ""
            parts.append(f"{step} {at - before:.2f} s{size}")
            before = at
        return f"ClientApp task: {', '.join(parts)}; {before - self.taken:.2f} s in all since the runner took it"


def run_approved_clientapp(runtime_api_address: str, token: str, approved_apps: Path,
                           parent_pid: int | None, taken: float | None = None) -> None:
    """Flower's `flwr-clientapp` for one task, refusing a bundle that is not approved before unpacking it."""
    module = _flower_clientapp_module()
    pull_task_input, install_from_fab = module.pull_task_input, module.install_from_fab
    clock = TaskClock(time.time() if taken is None else taken)
    clock.mark("started")
    claimed: dict[str, str] = {}

    def pull_and_remember(client: Any) -> Any:
        clock.mark("connected")
        message, context, run, fab = pull_task_input(client)
        claimed["hash"] = fab.hash_str  # the hash the SuperLink names; checked against the bytes below
        claimed["fab_id"], claimed["fab_version"] = getattr(run, "fab_id", ""), getattr(run, "fab_version", "")
        clock.state_bytes = _state_bytes(context)
        clock.mark("inputs pulled")
        return message, context, run, fab

    def install_if_approved(content: bytes, *args: Any, **kwargs: Any) -> Any:
        try:
            approved = ApprovedApps.load(approved_apps)
        except ConfigError as error:
            LOG.error("%s", error)  # the local path stays in the node's log, not in the reply
            raise AppNotApproved("refused: this node's approved-apps file could not be read; nothing of the app "
                                 "ran on this node; the institution's operator sees why in the SuperNode log") from None
        digest = check_bundle(content, claimed.get("hash", ""), approved)
        LOG.info("app bundle %s is approved; starting its ClientApp", digest)
        installed = _installed_before(claimed["fab_id"], claimed["fab_version"], digest)
        if installed is None:
            installed = install_from_fab(content, *args, **kwargs)
        clock.mark("bundle checked and installed")
        return installed

    module.pull_task_input = pull_and_remember
    module.install_from_fab = install_if_approved
    _quicker_object_retries(module)
    _time_the_app(module, clock)
    module.run_clientapp(runtime_api_address=runtime_api_address, token=token, insecure=True,
                         certificates=None, parent_pid=parent_pid, runtime_dependency_install=False)


def _quicker_object_retries(module: Any) -> None:
    """Retry a part of the task's message that the SuperNode is still receiving after `OBJECT_RETRY_S`, doubling,
    instead of Flower's 1 s: the SuperNode offers the task before it has the message's parts from the SuperLink,
    and a task taken at once would otherwise wait a second for them. The retries go to the node's own SuperNode."""
    pull = getattr(module, "pull_and_inflate_object_from_tree", None)
    if callable(pull):
        module.pull_and_inflate_object_from_tree = functools.partial(pull, initial_backoff=OBJECT_RETRY_S)


def _installed_before(fab_id: str, fab_version: str, digest: str) -> Path | None:
    """The folder an earlier task installed this approved bundle into, where the ClientApp is then loaded from
    (Flower's `get_project_dir`); None when there is none yet. Flower's install would unpack the bundle and verify
    its files again (0.1-0.2 s a task here), then return that same folder unchanged."""
    from flwr.common.config import get_project_dir

    try:
        path = get_project_dir(fab_id, fab_version, digest)
    except (ValueError, TypeError):
        return None
    return path if (path / "pyproject.toml").is_file() else None


def _time_the_app(module: Any, clock: TaskClock) -> None:
    """Mark when the app is loaded and when its reply is pushed; log the task's summary. Timing only: where a
    Flower version lacks these steps nothing is timed, and nothing else changes."""
    get_loader, push_message = getattr(module, "get_load_client_app_fn", None), getattr(module, "push_message", None)
    if not callable(get_loader) or not callable(push_message):
        return

    def timed_loader(*args: Any, **kwargs: Any) -> Any:
        load = get_loader(*args, **kwargs)

        def loaded(*load_args: Any) -> Any:
            app = load(*load_args)
            clock.mark("app loaded")
            return app

        return loaded

    def timed_push(*args: Any, **kwargs: Any) -> Any:
        clock.mark("ClientApp ran")
        pushed = push_message(*args, **kwargs)
        clock.mark("reply pushed")
        LOG.info("%s", clock.summary())
        return pushed

    module.get_load_client_app_fn = timed_loader
    module.push_message = timed_push


def _state_bytes(context: Any) -> int:
    """The size of the node state in `context` as Flower sends it (-1 when there is none to measure)."""
    from flwr.app import RecordDict
    from flwr.common.serde import recorddict_to_proto

    state = getattr(context, "state", None)
    return recorddict_to_proto(state).ByteSize() if isinstance(state, RecordDict) else -1


def task_processes() -> BaseContext:
    """Where tasks' processes come from: forks of a server process that imports `PRELOAD` once, now (so the
    first task finds it warm). Its imports failing is not an error: the task then imports what it needs."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(PRELOAD))
    multiprocessing.forkserver.ensure_running()
    return context


def clientapp_task(runtime_api_address: str, token: str, approved_apps: str, parent_pid: int, taken: float) -> None:
    """One task, in its own process forked from the task server (the target `dispatch` starts)."""
    _configure_logging()
    run_approved_clientapp(runtime_api_address, token, Path(approved_apps), parent_pid, taken)


def dispatch(runtime_api_address: str, approved_apps: Path, parent_pid: int | None) -> None:
    """Take the SuperNode's ClientApp tasks one by one and run each in a process of its own that checks its bundle."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    ApprovedApps.load(approved_apps)  # a missing or malformed list stops the node at start, not at the first run
    _flower_clientapp_module()
    processes = task_processes()
    # the task's target by its module's name: run with `-m`, this module is __main__, which a forked task cannot name
    task = importlib.import_module("simulations.deploy.runner").clientapp_task
    if parent_pid is not None:
        start_parent_process_monitor(parent_pid)
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=make_simple_http_retry_invoker(),
    )
    LOG.info("approval runner: ClientApps of approved app bundles only (list: %s)", approved_apps)
    try:
        while True:
            try:
                response = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP],
                                                                 agentapp_fab_hashes=[]))
            except Exception as error:  # pylint: disable=broad-except  # the SuperNode is starting or restarting
                LOG.debug("Runtime API not answering yet: %s", error)
                time.sleep(POLL_S)
                continue
            if response.HasField("task") and response.token:
                processes.Process(target=task, args=(  # type: ignore[attr-defined]
                    runtime_api_address, response.token, str(approved_apps), os.getpid(), time.time())).start()
            multiprocessing.active_children()  # reaps the tasks that ended
            time.sleep(POLL_S)
    finally:
        client.close()
        _stop(multiprocessing.active_children())


def _stop(tasks: list[Any]) -> None:
    """End the tasks still running when the node stops, as their own watch on this process would (SIGTERM: Flower's
    handler pushes their status), then wait for them."""
    for task in tasks:
        task.terminate()
    for task in tasks:
        task.join(STOP_GRACE_S)


def _configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s fedstill runner: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Runtime API request, several a second


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("role", choices=["dispatch", "clientapp"])
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API (loopback)")
    parser.add_argument("--approved-apps", type=Path, required=True, help="the institution's approved-apps file")
    parser.add_argument("--token", default="", help="clientapp: the task token from the SuperNode")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process exits")
    args = parser.parse_args(argv)
    _configure_logging()
    if args.role == "dispatch":
        try:
            dispatch(args.runtime_api_address, args.approved_apps.resolve(), args.parent_pid)
        except KeyboardInterrupt:  # the parent monitor's signal: the SuperNode is gone
            return
    else:  # one task in a fresh interpreter, as Flower's SuperExec runs it (no preloading)
        if not args.token:
            parser.error("clientapp needs --token")
        run_approved_clientapp(args.runtime_api_address, args.token, args.approved_apps, args.parent_pid)


if __name__ == "__main__":
    main()
