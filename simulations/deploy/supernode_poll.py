"""Flower's SuperNode, asking its SuperLink for messages every `--poll-interval` seconds instead of every 3.

Flower 1.42's SuperNode has no option for it: after a pull that brought no message its loop sleeps a fixed
3 s, it looks every 0.5 s whether the ClientApp's reply is ready, and it asks again for a part of a message
the SuperLink does not have yet after 1 s (`flwr/supernode/start_client_internal.py`). In a federated round
every node replies, finds nothing new while the server aggregates, and sleeps: the next round's query then
waits up to 3 s on every node, each round. `fedstill supernode` starts the SuperNode through this module,
which scales the sleeps of that loop, and only those, by poll-interval / 3 s, asks again for a missing part
after a fifth of poll-interval (doubling each time), and then runs Flower's own `flower-supernode` entry
point with the arguments given after `--`:

    python -m simulations.deploy.supernode_poll --poll-interval 0.5 -- --superlink host:port ...

Each poll is one authenticated request to the SuperLink: 0.5 s is two a second per node (Flower's 3 s: one
in three seconds). Should a Flower upgrade change that loop's module, the SuperNode runs with Flower's own
intervals and says so in its log.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from logging import INFO, WARNING
from typing import Any

FLOWER_POLL_S = 3.0  # the sleep of Flower 1.42's SuperNode loop after an empty pull
OBJECT_RETRY_FRACTION = 0.2  # a missing part of a message is asked for again after this share of the poll interval


class ScaledSleep:
    """The `time` module as the SuperNode's loop sees it: each of its sleeps multiplied by `factor`."""

    def __init__(self, factor: float) -> None:
        self.factor = factor

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds * self.factor)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def shorten_polls(poll_interval: float) -> bool:
    """Make the SuperNode loop poll every `poll_interval` seconds; False (nothing changed) when Flower's loop
    module does not use the `time` module as this was written for."""
    from flwr.supernode import start_client_internal as loop

    current = getattr(loop, "time", None)
    if isinstance(current, ScaledSleep):
        current.factor = poll_interval / FLOWER_POLL_S
        return True
    if current is not time or not callable(getattr(loop, "start_client_internal", None)):
        return False
    loop.time = ScaledSleep(poll_interval / FLOWER_POLL_S)  # type: ignore[assignment]
    pull_objects = getattr(loop, "pull_objects", None)
    if callable(pull_objects):  # a message's parts the SuperLink does not have yet (the server is still sending them)
        loop.pull_objects = functools.partial(pull_objects, initial_backoff=poll_interval * OBJECT_RETRY_FRACTION)
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--poll-interval", type=float, required=True, help="seconds between the SuperNode's polls")
    parser.add_argument("supernode_args", nargs=argparse.REMAINDER, help="-- then flower-supernode's own arguments")
    args = parser.parse_args(argv)
    rest = args.supernode_args[1:] if args.supernode_args[:1] == ["--"] else args.supernode_args
    if not 0 < args.poll_interval <= FLOWER_POLL_S:
        parser.error(f"--poll-interval must be in (0, {FLOWER_POLL_S:g}] seconds, got {args.poll_interval:g}")
    from flwr.common.logger import log, update_console_handler  # Flower's logger: the SuperNode's log keeps one format

    update_console_handler(timestamps=True)  # its lines then say when: a round's time can be followed on the node

    if shorten_polls(args.poll_interval):
        log(INFO, "fedstill: this SuperNode polls the SuperLink every %g s", args.poll_interval)
    else:
        log(WARNING, "fedstill: this Flower version's SuperNode loop is not the one --poll-interval was written for: it polls at "
                    "Flower's own interval (%g s); pin flwr to the project's version", FLOWER_POLL_S)
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *rest]
    flower_supernode()


if __name__ == "__main__":
    main()
