"""How Flower 1.42 ends a ServerApp whose run was stopped (`flwr stop RUN_ID FED`), told apart from a failure.

`flwr stop` marks the run `finished:stopped` on the SuperLink and revokes the ServerApp task's token. The
ServerApp's next call to the SuperLink, a grid push or pull in the main thread or the heartbeat thread's, is
refused (HTTP 401), and Flower's retry invoker sends its own process SIGINT (flwr/supercore/retry/http_retry.py,
`_should_giveup`; a heartbeat the SuperLink answers with "not running" does the same, flwr/supercore/heartbeat.py).
The SIGINT handler `flwr-serverapp` registered (flwr/superlink/runtime/run_serverapp.py, `register_signal_handlers`
of flwr/supercore/exit/signal_handler.py) calls `flwr_exit(ExitCode.GRACEFUL_EXIT_SIGINT, "Task stopped by user.")`
(flwr/supercore/exit/exit.py): its exit handlers push the task's output and close the grid, then `sys.exit(0)` raises
`SystemExit(0)` in the main thread, inside `main`, wherever it was. Flower ends the process 5 s after it began to
exit (`os._exit`), so what is recorded then must be quick, and nothing can reach the institutions any more. When the
heartbeat thread met the refusal first, Flower's exit handler waits for that thread (asleep for 6 s in the retry
invoker) past those 5 s, and the process ends before `main` records anything: the run folder is then as a killed
run leaves it, and resumes the same way.

Only that path is a stop: a SystemExit raised elsewhere, or Flower's graceful exit on SIGTERM or SIGQUIT (a
service manager, `kill`: Flower itself records those runs as failed), is recorded as a failure. So is any
exception. A SIGINT for another reason (Ctrl-C, or the SuperLink's process gone: flwr/supercore/app_utils.py)
takes the same path and is recorded as stopped too: the process cannot tell them apart. The one other way Flower
says a run is no longer running, `RunNotRunningException` (raised by its retry invoker when the SuperLink answers
403), is a stop too.
"""

from __future__ import annotations

from traceback import walk_tb

from flwr.supercore.exit import ExitCode, flwr_exit
from flwr.supercore.run import RunNotRunningException

STOPPED_NOTE = "stopped with `flwr stop`: Flower ended the ServerApp on SIGINT, \"Task stopped by user.\""
NOT_RUNNING_NOTE = "stopped with `flwr stop`: the SuperLink says the run is no longer running"


def stop_note(error: BaseException) -> str | None:
    """Why the run stopped, when `error` is Flower stopping the ServerApp; None for a failure."""
    if isinstance(error, RunNotRunningException):
        return NOT_RUNNING_NOTE
    if isinstance(error, SystemExit) and error.code in (0, None) and _flower_exit_code(error) == ExitCode.GRACEFUL_EXIT_SIGINT:
        return STOPPED_NOTE
    return None


def _flower_exit_code(error: BaseException) -> int | None:
    """The exit code `flwr_exit` was called with, when `error` came out of it; else None."""
    for frame, _ in walk_tb(error.__traceback__):
        if frame.f_code is flwr_exit.__code__:
            code = frame.f_locals.get("code")
            return code if isinstance(code, int) else None
    return None
