"""Paths on the node never leave in an error (client.scrub); the ClientApp path is in test_hostile_coordinator.py."""

from __future__ import annotations

import pytest
from flwr.app import Context, Message, RecordDict

from client.scrub import LOCAL_PATH, NodeError, local_detail_kept, scrubbed
from common.errors import ConfigError, PolicyViolation

pytestmark = pytest.mark.usefixtures("server_task")  # a Message needs a run


def message() -> Message:
    return Message(RecordDict(), dst_node_id=1, message_type="query", group_id="1")


@pytest.mark.parametrize(("text", "expected"), [
    ("signing key /srv/site a/key.pem not found", f"signing key {LOCAL_PATH} a/key.pem not found"),
    ("cannot write ~/.fedstill/teacher.pt: disk full", f"cannot write {LOCAL_PATH}: disk full"),
    ("PosixPath('/data/private/labels.csv')", f"PosixPath('{LOCAL_PATH}')"),
    ("q = 1/30 at epsilon 4/5", "q = 1/30 at epsilon 4/5"),
    ("see https://flower.ai/docs/x and and/or", "see https://flower.ai/docs/x and and/or"),
    ("site-policy: max-epsilon = 4 refuses privacy \"none\"", "site-policy: max-epsilon = 4 refuses privacy \"none\""),
])
def test_paths_are_replaced_and_nothing_else(text: str, expected: str) -> None:
    assert scrubbed(text) == expected


def _raising(error: Exception):
    @local_detail_kept
    def handler(message: Message, context: Context) -> Message:
        raise error
    return handler


@pytest.mark.parametrize("error", [ConfigError("key /etc/site/key.pem missing"), PolicyViolation("site-policy: x /a/b"),
                                   OSError(2, "No such file", "/data/x")])
def test_an_error_keeps_its_type_and_loses_its_paths(error: Exception) -> None:
    context = Context(1, 1, {}, RecordDict(), {})
    with pytest.raises(Exception) as raised:
        _raising(error)(message(), context)
    assert "/" not in str(raised.value).replace(LOCAL_PATH, "")
    assert type(raised.value) is type(error) or (isinstance(raised.value, NodeError) and
                                                 str(raised.value).startswith(type(error).__name__))


def test_an_error_without_paths_leaves_unchanged() -> None:
    error = PolicyViolation("site-policy: max-queries-per-round = 1 refuses query 2 of this round")
    with pytest.raises(PolicyViolation) as raised:
        _raising(error)(message(), Context(1, 1, {}, RecordDict(), {}))
    assert raised.value is error
