"""The unit suite's one in-memory Grid: Flower's Grid with each node's answer made in this process."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from flwr.app import Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from server import exchange

Answer = RecordDict | Error | Message | None


class VirtualClock:
    """The exchange's clock in the unit suite (conftest.py puts it in `server.exchange.CLOCK`): waiting moves it on at
    once, so a round-timeout costs no real time."""

    def __init__(self) -> None:
        self.time = 0.0

    def now(self) -> float:
        return self.time

    def sleep(self, seconds: float) -> None:
        self.time += max(seconds, 0.0)


class MemoryGrid(Grid):
    """Flower's Grid in memory. A pushed message gets an id, as Flower's grids give it, and its node's answer
    at once; the reply arrives `delay(message)` seconds later on the exchange's clock (at once without `delay`),
    and a pull hands back the replies that have arrived, in arrival order. `answer(message)` returns the reply's
    content, an `Error`, a whole reply `Message`, or None (the node stays silent); an exception it raises comes back
    as an error reply with the exception's text, as Flower's ClientApp sends it. Override `answer` or pass it in."""

    pull_interval = 0.1  # as Flower's InMemoryGrid waits between two pulls in send_and_receive

    def __init__(self, answer: Callable[[Message], Answer] | None = None, nodes: Iterable[int] = (), *,
                 message_ids: bool = True, delay: Callable[[Message], float] | None = None) -> None:
        self._answer = answer
        self.nodes = list(nodes)
        self.message_ids = message_ids  # False: a grid that leaves the questions without ids
        self.delay = delay
        self.sent: list[Message] = []
        self.pulled: list[list[str]] = []  # the ids asked for by each pull, in order
        self._replies: dict[str, tuple[float, int, Message]] = {}  # message id -> (arrival time, push order, reply)
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
                arrival = exchange.CLOCK.now() + (self.delay(message) if self.delay is not None else 0.0)
                self._replies[message_id] = (arrival, len(self.sent), reply)
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        asked = list(message_ids)
        self.pulled.append(asked)
        now = exchange.CLOCK.now()
        arrived = sorted((self._replies[i][:2], i) for i in asked if i in self._replies and self._replies[i][0] <= now)
        return [self._replies.pop(i)[2] for _, i in arrived]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """As Flower's: push, then pull until every reply is in or `timeout` has passed; a silent node never answers,
        so the wait ends when only silent ones are left (Flower's would wait for ever without a timeout)."""
        clock = exchange.CLOCK
        pending = set(self.push_messages(messages))
        deadline = clock.now() + (math.inf if timeout is None else timeout)
        replies: list[Message] = []
        while pending & set(self._replies):
            replies += self.pull_messages(sorted(pending))
            pending -= {r.metadata.reply_to_message_id for r in replies}
            if not pending & set(self._replies) or clock.now() >= deadline:
                break
            clock.sleep(self.pull_interval)
        return replies

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
