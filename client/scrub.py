"""Errors leave the node without its local detail: an error a ClientApp handler raises travels to the
coordinator as the reply's reason (Flower sends `str(error)`), so paths on the institution's machine are
replaced before it leaves, and the full message is logged on the node only.

Errors raised on purpose already name node config keys, counts and fixes, never paths or values from
private files (client.site scrubs the data loaders' errors; client.privacy the ledger's). This is the
net under all of them: whatever raises below a handler (a signing key that will not load, a teacher
store that cannot be written, a library's own error), no absolute or home-relative path reaches the
coordinator. The error keeps its type, so the coordinator still tells a refusal (`PolicyViolation`,
`PrivacyBudgetExceeded`) from a failure.

A refusal also names the institution that refuses: an error reply carries no attestation, so without its
name the ledger could not tell whose budget or policy refused when a node refuses its very first query.
The name is appended as the node claims it (common.audit.naming), unsigned, and shown as claimed.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from logging import WARNING

from flwr.app import Context, Message
from flwr.common.logger import log

from client.release import institution_name
from common.audit.naming import refusal_naming
from common.config import RunConfig
from common.errors import FedstillError, PolicyViolation, PrivacyBudgetExceeded
from common.node_config import NodeConfig

LOCAL_PATH = "<path on the node>"
_PATH = re.compile(r"(?<![\w.:/])~?/(?:[\w.@%+=,-]+/?)+")  # /abs/path, ~/rel, /path/; not 1/30 nor http://x/y

Handler = Callable[[Message, Context], Message]


def scrubbed(text: str) -> str:
    """`text` with every absolute or home-relative path replaced by `<path on the node>`."""
    return _PATH.sub(LOCAL_PATH, text)


def local_detail_kept(handler: Handler) -> Handler:
    """Wrap a ClientApp handler: an error leaves with its paths replaced, the original logged on the node; a
    refusal leaves naming the institution that refuses."""

    @functools.wraps(handler)
    def run(message: Message, context: Context) -> Message:
        try:
            return handler(message, context)
        except Exception as error:
            text = str(error)
            clean = scrubbed(text)
            if clean != text:
                log(WARNING, "%s on this node (the coordinator gets it without local paths): %s", type(error).__name__, text)
            if isinstance(error, REFUSALS) and (name := _institution(context)) is not None:
                clean = refusal_naming(clean, name)
            if clean == text:
                raise
            raise _same_kind(error, clean) from None

    return run


REFUSALS = (PrivacyBudgetExceeded, PolicyViolation)


def _institution(context: Context) -> str | None:
    """The institution this node signs as, or None (no identity, or a config that does not even parse)."""
    try:
        return institution_name(RunConfig.from_run_config(context.run_config), NodeConfig.from_node_config(context.node_config))
    except Exception:  # noqa: BLE001 - naming is a courtesy: the refusal leaves either way
        return None


class NodeError(FedstillError):
    """An error of another kind whose message had to be rewritten before it left the node."""


def _same_kind(error: Exception, message: str) -> Exception:
    try:
        rebuilt = type(error)(message)
    except Exception:  # noqa: BLE001 - an error type that takes other arguments: name it in a NodeError
        return NodeError(f"{type(error).__name__}: {message}")
    return rebuilt if str(rebuilt) == message else NodeError(f"{type(error).__name__}: {message}")
