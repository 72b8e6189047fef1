"""The unit suite's one in-memory Grid: Flower's Grid with each node's answer made in this process."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from flwr.app import Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

Answer = RecordDict | Error | Message | None


class MemoryGrid(Grid):
    """Flower's Grid in memory. A pushed message gets an id, as Flower's grids give it, and its node's answer
    at once; a pull hands the replies back. `answer(message)` returns the reply's content, an `Error`, a whole
    reply `Message`, or None (the node stays silent); an exception it raises comes back as an error reply with
    the exception's text, as Flower's ClientApp sends it. Override `answer` or pass it in."""

    def __init__(self, answer: Callable[[Message], Answer] | None = None, nodes: Iterable[int] = (), *,
                 message_ids: bool = True) -> None:
        self._answer = answer
        self.nodes = list(nodes)
        self.message_ids = message_ids  # False: a grid that leaves the questions without ids
        self.sent: list[Message] = []
        self._replies: dict[str, Message] = {}
        self._run: Run | None = None

    def answer(self, message: Message) -> Answer:
        if self._answer is None:
            raise NotImplementedError("give MemoryGrid an `answer`, or override it")
        return self._answer(message)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for message in messages:
            message_id = f"message-{len(self.sent)}"
            if self.message_ids:
                message.metadata.__dict__["_message_id"] = message_id  # as Flower's own grids set it
            self.sent.append(message)
            reply = self._reply(message)
            if reply is not None:
                self._replies[message_id] = reply
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        if self._run is None:
            raise RuntimeError("MemoryGrid: no run set")
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def sent_of(self, message_type: str) -> list[Message]:
        """The messages of one type sent so far, in order."""
        return [m for m in self.sent if m.metadata.message_type == message_type]

    def _reply(self, message: Message) -> Message | None:
        try:
            answer = self.answer(message)
        except Exception as error:  # as Flower's ClientApp turns an exception into an error reply
            answer = Error(code=0, reason=f"{type(error).__name__}: {error}")
        if answer is None or isinstance(answer, Message):
            return answer
        return Message(answer, reply_to=message)


@contextmanager
def server_task(run_id: int = 1) -> Iterator[None]:
    """Flower builds a Message only inside a running task: make this process a ServerApp's task meanwhile."""
    saved = TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = run_id, 1, 1
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved
