"""Cloud replicas as real processes on loopback, started and stopped safely (chapter 05, sections 2
and 6).

:class:`ReplicaSet` is a context manager that starts ``n`` uvicorn processes serving
:func:`labsupport.hybrid.service.app_from_env`, each ``python -m uvicorn --factory ... --host
127.0.0.1 --port 0`` in a new session (``start_new_session=True``, so each is the leader of its own
process group), reads the port uvicorn really bound from its stderr ("Uvicorn running on
http://127.0.0.1:PORT"), and waits until ``GET /health`` answers. Leaving the ``with`` block -- normally
or by an exception -- kills every group with ``os.killpg`` (SIGTERM, then SIGKILL after a grace period)
and reaps the processes, so nothing is left running; an ``atexit`` hook does the same for sets never
closed. ``kill(i)`` kills one replica abruptly (SIGKILL to its group: the failover experiment) and
``restart(i)`` brings it back on the same port. Each process runs one torch thread
(``OMP_NUM_THREADS=1`` and ``torch.set_num_threads(1)`` in the app).
"""

from __future__ import annotations

import atexit
import collections
import os
import re
import signal
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import httpx

__all__ = ["Replica", "ReplicaSet", "process_group_alive"]

_PORT_LINE = re.compile(r"Uvicorn running on https?://127\.0\.0\.1:(\d+)")
_LIVE: weakref.WeakSet = weakref.WeakSet()


def process_group_alive(pgid: int) -> bool:
    """True while any process of group ``pgid`` exists (signal 0 probes without sending)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@dataclass
class Replica:
    """One uvicorn process: its Popen, port, URL, and the last lines of its stderr."""

    name: str
    proc: subprocess.Popen
    port: int | None = None
    log: collections.deque = field(default_factory=lambda: collections.deque(maxlen=200))
    ready: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError(f"replica {self.name} has not reported its port yet")
        return f"http://127.0.0.1:{self.port}"

    @property
    def pgid(self) -> int:
        return self.proc.pid  # the session leader's pid is the group id

    def alive(self) -> bool:
        return self.proc.poll() is None


def _drain(replica: Replica) -> None:
    """Read the child's stderr until it closes (a full pipe would block the child)."""
    assert replica.proc.stderr is not None
    for raw in replica.proc.stderr:
        line = raw.decode(errors="replace").rstrip()
        replica.log.append(line)
        match = _PORT_LINE.search(line)
        if match and replica.port is None:
            replica.port = int(match.group(1))
            replica.ready.set()
    replica.proc.stderr.close()
    replica.ready.set()  # the process ended: wake whoever waits


class ReplicaSet:
    """``n`` cloud replicas of the checkpoint ``model_path`` on 127.0.0.1 (see the module docstring).

    ``env`` adds environment variables for every replica (``HYBRID_MICROBATCH``, ...);
    ``per_replica_env`` a dict per replica (e.g. ``HYBRID_DELAY_MS`` for one slow replica).
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        n: int = 2,
        *,
        env: dict[str, str] | None = None,
        per_replica_env: list[dict[str, str]] | None = None,
        startup_timeout_s: float = 60.0,
        grace_s: float = 3.0,
    ) -> None:
        if n < 1:
            raise ValueError(f"need at least one replica, got n={n}")
        if per_replica_env is not None and len(per_replica_env) != n:
            raise ValueError(f"per_replica_env has {len(per_replica_env)} entries for {n} replicas")
        path = Path(model_path)
        if not path.with_suffix(".json").exists() or not path.with_suffix(".safetensors").exists():
            raise FileNotFoundError(f"no checkpoint {path.with_suffix('')}.(json|safetensors)")
        self.model_path = path
        self.n = n
        self.env = dict(env or {})
        self.per_replica_env = per_replica_env or [{} for _ in range(n)]
        self.startup_timeout_s = startup_timeout_s
        self.grace_s = grace_s
        self.replicas: list[Replica | None] = [None] * n
        self._ports: list[int] = [0] * n

    # ---------------------------------------------------------------------------- lifecycle
    def __enter__(self) -> ReplicaSet:
        _LIVE.add(self)
        try:
            for i in range(self.n):
                self._spawn(i)
            for i in range(self.n):
                self._wait_ready(i)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self._ports]

    @property
    def pgids(self) -> list[int]:
        return [r.pgid for r in self.replicas if r is not None]

    def _spawn(self, i: int) -> None:
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "HYBRID_MODEL": str(self.model_path),
            "HYBRID_REPLICA": f"replica-{i}",
            **self.env,
            **self.per_replica_env[i],
        }
        cmd = [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "labsupport.hybrid.service:app_from_env",
            "--host",
            "127.0.0.1",
            "--port",
            str(self._ports[i]),
            "--no-access-log",
            # no proxy sits in front of a loopback replica: trusting X-Forwarded-For would only let
            # a client claim another address, and parsing it is work on every request
            "--no-proxy-headers",
            "--log-level",
            "info",
            "--timeout-graceful-shutdown",
            "1",
        ]
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        replica = Replica(name=f"replica-{i}", proc=proc)
        threading.Thread(target=_drain, args=(replica,), daemon=True).start()
        self.replicas[i] = replica

    def _wait_ready(self, i: int) -> None:
        replica = self.replicas[i]
        assert replica is not None
        deadline = time.monotonic() + self.startup_timeout_s
        if not replica.ready.wait(self.startup_timeout_s) or replica.port is None:
            tail = "\n".join(list(replica.log)[-15:])
            raise RuntimeError(f"{replica.name} did not report a port; its stderr ends:\n{tail}")
        self._ports[i] = replica.port
        while time.monotonic() < deadline:
            if not replica.alive():
                tail = "\n".join(list(replica.log)[-15:])
                raise RuntimeError(f"{replica.name} exited with {replica.proc.returncode}:\n{tail}")
            try:
                if httpx.get(f"{replica.url}/health", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise TimeoutError(
            f"{replica.name} on {replica.url} not healthy after {self.startup_timeout_s} s"
        )

    def kill(self, i: int, sig: int = signal.SIGKILL) -> None:
        """Kill replica ``i``'s process group abruptly (default SIGKILL) and reap it."""
        replica = self.replicas[i]
        if replica is None:
            return
        _killpg(replica, sig, self.grace_s)

    def restart(self, i: int) -> None:
        """Start replica ``i`` again on its previous port and wait until it is healthy."""
        self.kill(i)
        self._spawn(i)
        self._wait_ready(i)

    def stop(self) -> None:
        """Stop every replica: SIGTERM to each group, SIGKILL after ``grace_s``, then reap."""
        for replica in self.replicas:
            if replica is not None:
                _killpg(replica, signal.SIGTERM, self.grace_s)
        _LIVE.discard(self)


def _killpg(replica: Replica, sig: int, grace_s: float) -> None:
    with_group = process_group_alive(replica.pgid)
    if with_group:
        try:
            os.killpg(replica.pgid, sig)
        except ProcessLookupError:
            pass
    try:
        replica.proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    if process_group_alive(replica.pgid):  # the leader, or a child it left behind
        try:
            os.killpg(replica.pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        replica.proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL is not ignorable
        pass


@atexit.register
def _stop_all() -> None:  # pragma: no cover - the safety net for sets never closed
    for rs in list(_LIVE):
        rs.stop()
