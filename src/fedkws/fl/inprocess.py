"""An in-process stand-in for Flower's ``Grid``: the same ClientApp handlers, no Ray.

``federation.backend=inprocess`` runs every client message in the driver
process, one after the other, through the very ``ClientApp`` that the Ray
backend runs in actors. It is for debugging and for tests: numbers are the
same as with Ray (messages are handled one at a time in both); it is slower
for real work because clients never run in parallel.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

_NODE_BASE = 1000


class InProcessGrid(Grid):
    """Node discovery and send-and-receive for ``num_clients`` in-process SuperNodes."""

    def __init__(self, client_app: ClientApp, num_clients: int) -> None:
        # Messages read the sender's identity from this process-wide record (Flower sets it
        # in a real ServerApp process).
        for name in ("_run_id", "_node_id", "_task_id"):
            if getattr(TaskIdentity, name) is None:
                setattr(TaskIdentity, name, 0)
        self.client_app = client_app
        self.contexts = {
            _NODE_BASE + pid: Context(
                run_id=0,
                node_id=_NODE_BASE + pid,
                node_config={"partition-id": pid, "num-partitions": num_clients},
                state=RecordDict(),
                run_config={},
            )
            for pid in range(num_clients)
        }
        self._ids = itertools.count(1)
        self._replies: dict[str, Message] = {}

    def set_run(self, run_id: int) -> None:  # noqa: D102 - Grid API
        pass

    @property
    def run(self):  # noqa: D102 - Grid API
        raise NotImplementedError("the in-process grid has no Flower run")

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # noqa: D102
        return Message(content, dst_node_id, message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102 - Grid API
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Handle each message now, in order; keep the replies for :meth:`pull_messages`."""
        ids = []
        for message in messages:
            message_id = f"m{next(self._ids)}"
            message.metadata.__dict__["_message_id"] = message_id
            message.metadata.__dict__["_src_node_id"] = 0
            self._replies[message_id] = self._handle(message)
            ids.append(message_id)
        return ids

    def _handle(self, message: Message) -> Message:
        threads = torch.get_num_threads()
        try:
            return self.client_app(message, self.contexts[message.metadata.dst_node_id])
        except Exception as err:  # a client's failure is a reply, as with Ray
            return Message(Error(code=1, reason=f"{type(err).__name__}: {err}"), reply_to=message)
        finally:
            torch.set_num_threads(threads)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages, *, timeout=None):  # noqa: D102 - Grid API
        return self.pull_messages(self.push_messages(messages))
