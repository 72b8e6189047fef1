"""The institution's ClientApp runner: it starts a run's ClientApp only if the app bundle is approved.

`fedstill supernode` starts `flower-supernode --isolation process`, so the SuperNode itself never
starts app code, and this runner beside it in place of Flower's SuperExec:

    python -m simulations.deploy.runner dispatch --runtime-api-address 127.0.0.1:9094 \
        --approved-apps approved-apps.toml --parent-pid <SuperNode pid>

`dispatch` asks the SuperNode's Runtime API for ClientApp tasks (and no other kind: an agent app,
a connector or a model task is never taken) and starts one `clientapp` process per task, as
Flower's SuperExec starts `flwr-clientapp`. The `clientapp` process is Flower's own
`run_clientapp` with one step added: after it pulls the task's inputs (message, context, run,
app bundle) and before it unpacks the bundle, the bytes received are hashed and checked against
the institution's approved list (simulations/deploy/approved_apps.py). An unapproved bundle is
never written to disk or imported; the task ends with an error reply the coordinator sees
("refused: app not approved by this institution ..."). Dependencies named by an app are never
installed at run time.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common.errors import ConfigError
from simulations.deploy.approved_apps import AppNotApproved, ApprovedApps, check_bundle

POLL_S = 0.5
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


def run_approved_clientapp(runtime_api_address: str, token: str, approved_apps: Path,
                           parent_pid: int | None) -> None:
    """Flower's `flwr-clientapp` for one task, refusing a bundle that is not approved before unpacking it."""
    module = _flower_clientapp_module()
    pull_task_input, install_from_fab = module.pull_task_input, module.install_from_fab
    claimed: dict[str, str] = {}

    def pull_and_remember(client: Any) -> Any:
        message, context, run, fab = pull_task_input(client)
        claimed["hash"] = fab.hash_str  # the hash the SuperLink names; checked against the bytes below
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
        return install_from_fab(content, *args, **kwargs)

    module.pull_task_input = pull_and_remember
    module.install_from_fab = install_if_approved
    module.run_clientapp(runtime_api_address=runtime_api_address, token=token, insecure=True,
                         certificates=None, parent_pid=parent_pid, runtime_dependency_install=False)


def dispatch(runtime_api_address: str, approved_apps: Path, parent_pid: int | None) -> None:
    """Take the SuperNode's ClientApp tasks one by one and start an approval-checking process for each."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    ApprovedApps.load(approved_apps)  # a missing or malformed list stops the node at start, not at the first run
    _flower_clientapp_module()
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
                subprocess.Popen([  # pylint: disable=consider-using-with
                    sys.executable, "-m", "simulations.deploy.runner", "clientapp",
                    "--runtime-api-address", runtime_api_address, "--token", response.token,
                    "--approved-apps", str(approved_apps), "--parent-pid", str(os.getpid()),
                ])
            time.sleep(POLL_S)
    finally:
        client.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("role", choices=["dispatch", "clientapp"])
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API (loopback)")
    parser.add_argument("--approved-apps", type=Path, required=True, help="the institution's approved-apps file")
    parser.add_argument("--token", default="", help="clientapp: the task token from the SuperNode")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process exits")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s fedstill runner: %(message)s")
    if args.role == "dispatch":
        try:
            dispatch(args.runtime_api_address, args.approved_apps.resolve(), args.parent_pid)
        except KeyboardInterrupt:  # the parent monitor's signal: the SuperNode is gone
            return
    else:
        if not args.token:
            parser.error("clientapp needs --token")
        run_approved_clientapp(args.runtime_api_address, args.token, args.approved_apps, args.parent_pid)


if __name__ == "__main__":
    main()
