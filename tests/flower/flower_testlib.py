"""Helpers for the Flower tests: messages and contexts as a SuperNode sees them, in-process grids.

The ClientApp is called as Flower calls it -- ``app(message, context)`` with a ``Message`` built by
hand -- and a :class:`InProcessGrid` hands a strategy's messages straight to it (no SuperLink).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

import torch
from flwr.app import (
    DEFAULT_TTL,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    Metadata,
    RecordDict,
)
from flwr.serverapp import Grid

from labsupport.flower.deployment import TAG, LocalDeployment
from labsupport.flower.simulation import import_app

APP = import_app()
task, client_app, server_app = APP["task"], APP["client_app"], APP["server_app"]


def make_message(
    content: RecordDict, message_type: str, node_id: int, message_id: str = "m"
) -> Message:
    """An instruction message as a SuperNode receives it (metadata set by hand: no SuperLink)."""
    metadata = Metadata(
        run_id=1,
        message_id=message_id,
        src_node_id=1,
        dst_node_id=node_id,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=DEFAULT_TTL,
        message_type=message_type,
    )
    return Message(content=content, metadata=metadata)


def make_context(partition_id: int, num_partitions: int, run_config: dict | None = None) -> Context:
    return Context(
        run_id=1,
        node_id=100 + partition_id,
        node_config={"partition-id": partition_id, "num-partitions": num_partitions},
        state=RecordDict(),
        run_config=dict(run_config or {}),
    )


def instruction(
    state: dict[str, torch.Tensor], config: task.AppConfig, server_round: int
) -> RecordDict:
    return RecordDict(
        {
            "arrays": ArrayRecord(state),
            "config": ConfigRecord({**config.client_config(), "server-round": server_round}),
        }
    )


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


# ------------------------------------------------------------------------------------ configuration
class InProcessGrid(Grid):
    """A Grid that hands every message straight to the ClientApp of its node (no SuperLink)."""

    def __init__(self, num_nodes: int) -> None:
        self.contexts = {100 + i: make_context(i, num_nodes) for i in range(num_nodes)}

    def set_run(self, run) -> None:  # pragma: no cover - not used by strategies
        raise NotImplementedError

    @property
    def run(self):  # pragma: no cover
        raise NotImplementedError

    def create_message(
        self, content, message_type, dst_node_id, group_id, ttl=None
    ):  # pragma: no cover
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages):  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None) -> Iterable[Message]:
        return [self._deliver(m) for m in messages]

    def _deliver(self, message: Message) -> Message:
        return client_app.app(message, self.contexts[message.metadata.dst_node_id])


class FlakyGrid(InProcessGrid):
    """Nodes in ``failing`` answer with an error reply, as Flower sends when a ClientApp raises."""

    def __init__(self, num_nodes: int, failing: set[int]) -> None:
        super().__init__(num_nodes)
        self.failing = {100 + i for i in failing}

    def _deliver(self, message: Message) -> Message:
        if message.metadata.dst_node_id in self.failing:
            return Message(Error(code=1, reason="ClientApp raised boom"), reply_to=message)
        return super()._deliver(message)


# ------------------------------------------------------------------------ processes


def live_processes() -> dict[int, tuple[int, str, bytes]]:
    """pid -> (process group, command line, environment) of every live, non-zombie process."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            env = (entry / "environ").read_bytes()
        except OSError:
            continue
        if fields[0] != "Z":
            out[int(entry.name)] = (int(fields[2]), cmd, env)
    return out


def ours(deployment: LocalDeployment) -> dict[int, str]:
    """Live processes that carry this deployment's tag, with their command lines."""
    tag = f"{TAG}={deployment.token}".encode()
    return {pid: cmd for pid, (_, cmd, env) in live_processes().items() if tag in env.split(b"\0")}


def assert_all_stopped(deployment: LocalDeployment, seen: dict[int, str]) -> None:
    live = live_processes()
    left = {pid: cmd for pid, cmd in seen.items() if pid in live}
    assert not left, f"still running after close(): {left}"
    groups = {pid for pid in deployment.started_pids}  # start_new_session: group id == pid
    in_groups = {pid: cmd for pid, (pgid, cmd, _) in live.items() if pgid in groups}
    assert not in_groups, f"processes left in the started process groups: {in_groups}"
    assert ours(deployment) == {}
    assert deployment.alive() == []
