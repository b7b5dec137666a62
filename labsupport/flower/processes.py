"""Processes for Flower's engines: one place to start, watch and stop them, and run them offline.

Flower's Deployment Engine is a handful of long-running programs (``flower-superlink``,
``flower-supernode``, the ``flower-superexec`` each of them starts, and the ``flwr-serverapp`` /
``flwr-clientapp`` processes those start per run), and its Simulation Engine starts Ray's workers.
Chapter 01 runs both on a laptop, so everything they start must be stopped again -- also when a run
fails -- and nothing may reach the internet. What this module gives both engines:

* :data:`OFFLINE_ENV` -- the environment that keeps Flower, Ray and Hugging Face offline and quiet;
* :func:`spawn` -- start a command in a process group of its own, its output appended to a log file;
* :func:`stop_group` -- SIGTERM to the process group, SIGKILL after a grace period;
* :func:`free_ports`, :func:`port_open` -- loopback ports;
* :func:`wait_until` -- poll a readiness check; if a watched process dies or time runs out, raise
  :class:`ProcessError` with the tail of the relevant log (never hang, never fail silently);
* :func:`tagged_pids`, :func:`descendants`, :func:`alive` -- find what a program left behind (Flower
  detaches the SuperLink's ``flower-superexec`` into a session of its own; Ray's workers outlive
  ``ray.shutdown`` for a moment).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

__all__ = [
    "OFFLINE_ENV",
    "ProcessError",
    "alive",
    "descendants",
    "free_ports",
    "port_open",
    "signal_group",
    "spawn",
    "stop_group",
    "stop_tagged",
    "tagged_pids",
    "tail",
    "wait_until",
]

#: Settings every Flower/Ray process gets: no telemetry, no update checks, no ``uv sync`` of an
#: app's dependencies at run time, no Ray usage stats, Hugging Face offline, unbuffered logs.
OFFLINE_ENV: dict[str, str] = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",  # silences a FutureWarning of Ray 2.5x
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "PYTHONUNBUFFERED": "1",
}


class ProcessError(RuntimeError):
    """A process failed to start, died, or did not become ready in time (the message has its log)."""


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct TCP ports that are free on ``host`` right now (bound, then released)."""
    if not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be a non-negative integer, got {count!r}")
    socks, ports = [], []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """True if something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def tail(path: str | os.PathLike, lines: int = 30) -> str:
    """The last ``lines`` lines of a log file ("(no log)" if it cannot be read)."""
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:]) or "(empty log)"


def spawn(
    cmd: Sequence[str],
    log: str | os.PathLike,
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
) -> subprocess.Popen:
    """Start ``cmd`` in a new session (its own process group, group id = its pid).

    stdout and stderr are appended to ``log``, after a ``$ command`` header line; stdin is closed.
    ``env`` defaults to this process's environment.
    """
    if not cmd:
        raise ValueError("cmd is empty; expected a program and its arguments")
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        fh.write(f"$ {subprocess.list2cmdline(list(cmd))}\n".encode())
        fh.flush()
        return subprocess.Popen(
            list(cmd),
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
        )


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Signal ``proc``'s process group -- only while ``proc`` is unreaped, so that its id cannot have
    been reused by someone else's group."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)  # start_new_session: the group id is the pid
        except (ProcessLookupError, PermissionError):
            pass


def stop_group(proc: subprocess.Popen, timeout: float = 10.0) -> int | None:
    """Stop ``proc``'s process group: SIGTERM, then SIGKILL if it is still alive after ``timeout``
    seconds. Returns the exit code (None if even SIGKILL did not end it within 5 s)."""
    for sig, grace in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        signal_group(proc, sig)
        try:
            return proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
    return proc.poll()


def alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc (macOS): trust kill(0)


def tagged_pids(name: str, value: str) -> list[int]:
    """PIDs of live processes (other than this one) whose environment holds ``name=value``."""
    needle = f"{name}={value}".encode()
    found: list[int] = []
    proc = Path("/proc")
    if proc.is_dir():
        for entry in proc.iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                env = (entry / "environ").read_bytes()
            except OSError:
                continue
            if needle in env.split(b"\0") and alive(int(entry.name)):
                found.append(int(entry.name))
        return found
    try:  # macOS and others: psutil, if it is installed
        import psutil
    except ImportError:
        return found
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and p.environ().get(name) == value:
                found.append(p.pid)
        except (psutil.Error, OSError):
            continue
    return found


def descendants(pid: int) -> list[tuple[int, str]]:
    """``(pid, command line)`` of every live descendant of ``pid`` (Linux ``/proc``; else empty)."""
    children: dict[int, list[int]] = {}
    cmdlines: dict[int, str] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] == "Z":
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
        cmdlines[int(entry.name)] = cmd
    out, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        out.append((child, cmdlines.get(child, "")))
        todo.extend(children.get(child, []))
    return out


def wait_until(
    ready: Callable[[], bool],
    *,
    what: str,
    timeout: float,
    log: str | os.PathLike | None = None,
    watch: Mapping[str, tuple[subprocess.Popen, str | os.PathLike]] | None = None,
    interval: float = 0.2,
) -> None:
    """Poll ``ready()`` until it is true.

    Raises :class:`ProcessError` as soon as a process in ``watch`` (``name -> (process, its log)``)
    has exited -- with its exit code and log tail -- or after ``timeout`` seconds, saying that
    ``what`` did not happen, with the tail of ``log``.
    """
    deadline = time.monotonic() + timeout
    while not ready():
        for name, (proc, proc_log) in (watch or {}).items():
            if proc.poll() is not None:
                raise ProcessError(
                    f"{name} exited with code {proc.returncode} while waiting for: {what}; "
                    f"its log {proc_log} ends:\n{tail(proc_log)}"
                )
        if time.monotonic() > deadline:
            where = f"; the log {log} ends:\n{tail(log)}" if log is not None else ""
            raise ProcessError(f"timed out after {timeout:g} s waiting for: {what}{where}")
        time.sleep(interval)


def stop_tagged(name: str, value: str, timeout: float = 10.0) -> list[int]:
    """SIGTERM every process tagged ``name=value``, SIGKILL what is left after ``timeout`` s.

    Returns the PIDs still alive afterwards (normally none).
    """
    for sig, grace in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        for pid in tagged_pids(name, value):
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + grace
        while tagged_pids(name, value) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not tagged_pids(name, value):
            return []
    return tagged_pids(name, value)
