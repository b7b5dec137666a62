"""Flower's Deployment Engine on one machine: a SuperLink and N SuperNodes as real processes.

Chapter 01 ends by running its Flower app (``flower_app/fedmnist1d``) the way it runs on real devices,
only on loopback: :class:`LocalDeployment` starts

* ``flower-superlink --insecure --disable-runtime-dependency-installation --host 127.0.0.1 --port P``
  -- in Flower 1.42 the SuperLink serves its Fleet, Control and ServerAppIo APIs over HTTP on one
  port; it launches ``flower-superexec``, which launches ``flwr-serverapp`` for each run;
* N x ``flower-supernode --insecure --superlink 127.0.0.1:P --host 127.0.0.1 --port Q_i
  --node-config "partition-id=i num-partitions=N"`` -- each launches a ``flower-superexec``, which
  launches ``flwr-clientapp`` for each run;

writes the connection ``[superlink.<name>]`` (``address``, ``insecure = true``) into
``$FLWR_HOME/config.toml``, and :meth:`LocalDeployment.run` submits the app with
``flwr run <app_dir> <name> --stream --run-config <overrides.toml>``, streaming the log, then reads the
JSON the ServerApp writes to its ``results-file``. On real hardware the same commands run on a
server and on Jetsons / Raspberry Pis, with TLS and SuperNode authentication instead of
``--insecure`` (``flower_app/README.md``).

Offline and contained: every process gets ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` (no
``uv sync`` at run time), ``FLWR_TELEMETRY_ENABLED=0``, ``FLWR_DISABLE_UPDATE_CHECK=1``,
``HF_HUB_OFFLINE=1``, ``HF_DATASETS_OFFLINE=1``, a project-local ``FLWR_HOME`` (``.flwr/`` in the
repository, git-ignored) and this Python's ``bin/`` first on ``PATH``. Each process starts in its own
process group and its log goes to a file in the run directory. Flower detaches the SuperLink's
``flower-superexec`` into a session of its own, and a SuperNode's ``flower-superexec`` outlives it, so
:meth:`LocalDeployment.close` stops not only the process groups it started but every process that
carries this deployment's tag in its environment (``LABSUPPORT_DEPLOYMENT``): SIGTERM, then SIGKILL
after ``stop_timeout`` seconds -- also when a run fails or raises.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

try:
    import tomllib
except ImportError:  # Python 3.10: the same parser, as a package (a dependency of flwr)
    import tomli as tomllib

__all__ = ["DeploymentError", "LocalDeployment", "free_ports", "main"]

REPO = Path(__file__).resolve().parents[2]
DEFAULT_APP_DIR = REPO / "flower_app"
TAG = "LABSUPPORT_DEPLOYMENT"

OFFLINE_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "PYTHONUNBUFFERED": "1",
}


class DeploymentError(RuntimeError):
    """A process of the deployment failed to start, died, or a run did not complete."""


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct TCP ports that are free on ``host`` right now (bound, then released)."""
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


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:]) or "(empty log)"


def _alive(pid: int) -> bool:
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


def _tagged_pids(token: str) -> list[int]:
    """PIDs of live processes whose environment carries ``LABSUPPORT_DEPLOYMENT=token``."""
    needle = f"{TAG}={token}".encode()
    found = []
    proc = Path("/proc")
    if proc.is_dir():
        for entry in proc.iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                env = (entry / "environ").read_bytes()
            except OSError:
                continue
            if needle in env.split(b"\0") and _alive(int(entry.name)):
                found.append(int(entry.name))
        return found
    try:  # macOS and others: psutil, if it is installed
        import psutil
    except ImportError:
        return found
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and p.environ().get(TAG) == token:
                found.append(p.pid)
        except (psutil.Error, OSError):
            continue
    return found


def _toml_file(values: Mapping[str, Any], path: Path) -> Path:
    """Write flat ``key = value`` TOML (str/int/float/bool values) for ``--run-config FILE``."""
    lines = []
    for key, value in values.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            text = repr(value)
        elif isinstance(value, str):
            text = json.dumps(value)  # a JSON string is a valid TOML basic string
        else:
            raise TypeError(f"run config {key!r} = {value!r}: expected str, int, float or bool")
        lines.append(f"{json.dumps(key)} = {text}")
    path.write_text("\n".join(lines) + "\n")
    return path


class LocalDeployment:
    """A SuperLink and ``num_supernodes`` SuperNodes on loopback; use as a context manager.

    ``app_dir`` is the Flower app (default: the repository's ``flower_app``); ``flwr_home`` defaults
    to ``.flwr/`` in the repository; ``superlink_port`` and the SuperNodes' ``supernode_ports``
    (their ClientAppIo/runtime API) are picked free if not given; logs go to ``run_dir`` (a new
    temporary directory if not given). ``startup_timeout`` bounds the wait for the SuperLink's
    port and each SuperNode's registration; ``stop_timeout`` the grace between SIGTERM and SIGKILL.

    State: the processes it started, their log files, the connection name it wrote.
    """

    def __init__(
        self,
        app_dir: str | os.PathLike = DEFAULT_APP_DIR,
        num_supernodes: int = 2,
        *,
        flwr_home: str | os.PathLike | None = None,
        superlink_port: int | None = None,
        supernode_ports: Sequence[int] | None = None,
        run_dir: str | os.PathLike | None = None,
        host: str = "127.0.0.1",
        startup_timeout: float = 90.0,
        stop_timeout: float = 10.0,
        env: Mapping[str, str] | None = None,
    ) -> None:
        if not isinstance(num_supernodes, int) or num_supernodes < 1:
            raise ValueError(f"num_supernodes must be a positive integer, got {num_supernodes!r}")
        self.app_dir = Path(app_dir).resolve()
        if not (self.app_dir / "pyproject.toml").exists():
            raise FileNotFoundError(f"no pyproject.toml in the Flower app directory {self.app_dir}")
        self.num_supernodes = num_supernodes
        self.host = host
        self.flwr_home = Path(flwr_home) if flwr_home is not None else REPO / ".flwr"
        ports = free_ports(1 + num_supernodes, host)
        self.superlink_port = superlink_port or ports[0]
        self.supernode_ports = list(supernode_ports) if supernode_ports is not None else ports[1:]
        if len(self.supernode_ports) != num_supernodes:
            raise ValueError(
                f"supernode_ports has {len(self.supernode_ports)} ports for {num_supernodes} SuperNodes"
            )
        if len({self.superlink_port, *self.supernode_ports}) != 1 + num_supernodes:
            raise ValueError(
                f"ports must be distinct: {self.superlink_port}, {self.supernode_ports}"
            )
        self.run_dir = (
            Path(run_dir) if run_dir is not None else Path(tempfile.mkdtemp(prefix="flwr-deploy-"))
        )
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.token = uuid.uuid4().hex
        self.connection = f"labsupport-{self.superlink_port}"
        self.processes: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self.started_pids: set[int] = set()
        self._extra_env = dict(env or {})
        self._runs = 0

    # ------------------------------------------------------------------------------- start
    @property
    def address(self) -> str:
        return f"{self.host}:{self.superlink_port}"

    def environment(self) -> dict[str, str]:
        """The environment every process gets (offline settings, FLWR_HOME, the tag, PATH)."""
        env = dict(os.environ)
        env.update(OFFLINE_ENV)
        env["FLWR_HOME"] = str(self.flwr_home.resolve())
        env[TAG] = self.token
        # this Python's bin/, not resolved: a venv's bin/ holds the flwr tools (flower-superexec ...)
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
        env.update(self._extra_env)
        return env

    def commands(self) -> dict[str, list[str]]:
        """The command line of every long-running process, by name."""
        cmds = {
            "superlink": [
                self._tool("flower-superlink"),
                "--insecure",
                "--disable-runtime-dependency-installation",
                "--host",
                self.host,
                "--port",
                str(self.superlink_port),
            ]
        }
        n = self.num_supernodes
        for i, port in enumerate(self.supernode_ports):
            cmds[f"supernode-{i}"] = [
                self._tool("flower-supernode"),
                "--insecure",
                "--superlink",
                self.address,
                "--host",
                self.host,
                "--port",
                str(port),
                "--node-config",
                f"partition-id={i} num-partitions={n}",
            ]
        return cmds

    def start(self) -> LocalDeployment:
        """Start the SuperLink, wait for its port, start the SuperNodes, wait for them to register."""
        if self.processes:
            raise RuntimeError("this deployment is already started")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        try:
            cmds = self.commands()
            self._spawn("superlink", cmds.pop("superlink"))
            self._wait(
                "superlink",
                lambda: _port_open(self.host, self.superlink_port),
                f"open its port {self.superlink_port}",
            )
            self._write_connection()
            for name, cmd in cmds.items():
                self._spawn(name, cmd)
            for name in cmds:
                log = self.logs[name]
                self._wait(
                    name,
                    lambda log=log: "SuperNode ID:" in _tail(log, 200),
                    "register with the SuperLink",
                )
        except BaseException:
            self.close()
            raise
        return self

    def _tool(self, name: str) -> str:
        local = Path(sys.executable).parent / name
        found = str(local) if local.exists() else shutil.which(name)
        if found is None:
            raise FileNotFoundError(
                f"{name} is not installed next to {sys.executable} or on PATH (pip install flwr)"
            )
        return found

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = self.run_dir / f"{name}.log"
        with open(log, "ab") as fh:
            fh.write(f"$ {subprocess.list2cmdline(cmd)}\n".encode())
            fh.flush()
            proc = subprocess.Popen(
                cmd,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.environment(),
                cwd=self.run_dir,
                start_new_session=True,
            )
        self.processes[name], self.logs[name] = proc, log
        self.started_pids.add(proc.pid)
        return proc

    def _wait(self, name: str, ready: Callable[[], bool], what: str) -> None:
        """Poll ``ready`` until true; raise with the log tail of any process that died meanwhile."""
        deadline = time.monotonic() + self.startup_timeout
        while not ready():
            for other, proc in self.processes.items():
                if proc.poll() is not None:
                    raise DeploymentError(
                        f"{other} exited with code {proc.returncode} before {name} could {what}; "
                        f"its log {self.logs[other]} ends:\n{_tail(self.logs[other])}"
                    )
            if time.monotonic() > deadline:
                raise DeploymentError(
                    f"{name} did not {what} within {self.startup_timeout:g} s; "
                    f"its log {self.logs[name]} ends:\n{_tail(self.logs[name])}"
                )
            time.sleep(0.2)

    def _write_connection(self) -> None:
        """Add ``[superlink.<connection>]`` to ``$FLWR_HOME/config.toml``, keeping what is there."""
        path = self.flwr_home / "config.toml"
        if path.exists():
            config = tomllib.loads(path.read_text())
        else:  # start from the file flwr itself would create, so plain `flwr run` still works
            with warnings.catch_warnings():  # flwr.cli imports typer, which warns about click
                warnings.simplefilter("ignore", DeprecationWarning)
                from flwr.cli.constant import DEFAULT_FLOWER_CONFIG_TOML

            config = tomllib.loads(DEFAULT_FLOWER_CONFIG_TOML)
        config.setdefault("superlink", {})[self.connection] = {
            "address": self.address,
            "insecure": True,
        }
        self._dump_config(path, config)

    def _remove_connection(self) -> None:
        path = self.flwr_home / "config.toml"
        try:
            config = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError):
            return
        if config.get("superlink", {}).pop(self.connection, None) is not None:
            self._dump_config(path, config)

    @staticmethod
    def _dump_config(path: Path, config: dict) -> None:
        import tomli_w  # a dependency of flwr

        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        tmp.write_text(tomli_w.dumps(config))
        os.replace(tmp, path)

    # --------------------------------------------------------------------------------- run
    def run(
        self,
        run_config: Mapping[str, Any] | None = None,
        *,
        stream: bool = True,
        on_line: Callable[[str], None] | None = None,
        timeout: float = 600.0,
    ) -> dict[str, Any]:
        """``flwr run`` the app with ``run_config`` overrides; return the ServerApp's results JSON.

        ``num-partitions`` defaults to the number of SuperNodes and ``results-file`` to a file in
        the run directory. The run's log is always streamed (``flwr run --stream`` waits for the run
        to end) into ``flwr-run-<n>.log``; with ``stream`` every line also goes to ``on_line``
        (default: print).
        Raises :class:`DeploymentError` if ``flwr run`` fails, the run does not complete, or a
        deployment process died; :class:`TimeoutError` after ``timeout`` seconds.
        """
        if "superlink" not in self.processes:
            raise RuntimeError(
                "start the deployment first (use it as a context manager or call start())"
            )
        self._runs += 1
        results = self.run_dir / f"run-{self._runs}" / "results.json"
        overrides = {
            "num-partitions": self.num_supernodes,
            "results-file": str(results),
            **(run_config or {}),
        }
        results = Path(overrides["results-file"])
        results.parent.mkdir(parents=True, exist_ok=True)
        results.unlink(missing_ok=True)
        toml = _toml_file(overrides, self.run_dir / f"run-{self._runs}.toml")
        cmd = [
            self._tool("flwr"),
            "run",
            str(self.app_dir),
            self.connection,
            "--stream",
            "--run-config",
            str(toml),
        ]
        emit = on_line if on_line is not None else (lambda line: print(line, flush=True))
        name = f"flwr-run-{self._runs}"
        log = self.run_dir / f"{name}.log"
        tail: collections.deque[str] = collections.deque(maxlen=40)
        env = self.environment()
        env["COLUMNS"] = "200"  # rich's wrapping of flwr's messages
        with open(log, "w") as fh:
            fh.write(f"$ {subprocess.list2cmdline(cmd)}\n")
            proc = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.run_dir,
                start_new_session=True,
                text=True,
                errors="replace",
            )
            self.processes[name], self.logs[name] = proc, log
            self.started_pids.add(proc.pid)

            def pump() -> None:
                assert proc.stdout is not None
                for raw in proc.stdout:
                    line = raw.rstrip("\n")
                    fh.write(raw)
                    fh.flush()
                    tail.append(line)
                    if stream:
                        emit(line)

            reader = threading.Thread(target=pump, daemon=True)
            reader.start()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._stop_group(proc)
                reader.join(5)
                raise TimeoutError(
                    f"`flwr run` did not finish within {timeout:g} s; last lines:\n"
                    + "\n".join(tail)
                ) from None
            reader.join(10)
        if proc.returncode != 0:
            raise DeploymentError(
                f"`{subprocess.list2cmdline(cmd)}` exited with code {proc.returncode}; last lines:\n"
                + "\n".join(tail)
            )
        payload = self._read_results(results)
        if payload is None or payload.get("status") != "completed":
            status = "no results file" if payload is None else f"status {payload.get('status')!r}"
            died = [
                n
                for n, p in self.processes.items()
                if not n.startswith("flwr-run") and p.poll() is not None
            ]
            raise DeploymentError(
                f"the run did not complete ({status} at {results}"
                + (f"; error: {payload['error']}" if payload and payload.get("error") else "")
                + (f"; exited: {died}" if died else "")
                + "). Last lines of `flwr run`:\n"
                + "\n".join(tail)
                + f"\nSuperLink log ({self.logs['superlink']}) ends:\n{_tail(self.logs['superlink'], 15)}"
            )
        return payload

    @staticmethod
    def _read_results(path: Path, wait: float = 10.0) -> dict | None:
        """The results JSON; the ServerApp may write the last version just after the stream ends."""
        deadline = time.monotonic() + wait
        payload = None
        while True:
            try:
                payload = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                payload = None
            if (
                payload is not None and payload.get("status") != "running"
            ) or time.monotonic() > deadline:
                return payload
            time.sleep(0.2)

    # -------------------------------------------------------------------------------- stop
    def alive(self) -> list[int]:
        """PIDs still alive among the processes started here and everything carrying the tag."""
        pids = {proc.pid for proc in self.processes.values() if proc.poll() is None}
        return sorted(pids | set(_tagged_pids(self.token)))

    @staticmethod
    def _signal_group(proc: subprocess.Popen, sig: int) -> None:
        """Signal ``proc``'s process group -- only while ``proc`` is unreaped, so that its id cannot
        have been reused by someone else's group (members left behind carry the tag instead)."""
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)  # start_new_session: the group id is the pid
            except (ProcessLookupError, PermissionError):
                pass

    def _stop_group(self, proc: subprocess.Popen) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            self._signal_group(proc, sig)
            try:
                proc.wait(timeout=self.stop_timeout)
                return
            except subprocess.TimeoutExpired:
                continue

    def close(self) -> None:
        """Stop every process started here: SIGTERM to each process group and tagged process, then
        SIGKILL to whatever is left after ``stop_timeout`` s. Safe to call twice."""
        for sig, grace in ((signal.SIGTERM, self.stop_timeout), (signal.SIGKILL, 5.0)):
            for proc in self.processes.values():
                self._signal_group(proc, sig)
            for pid in _tagged_pids(self.token):
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            deadline = time.monotonic() + grace
            while self.alive() and time.monotonic() < deadline:
                for proc in self.processes.values():
                    proc.poll()  # reap our own children
                time.sleep(0.1)
            if not self.alive():
                break
        for proc in self.processes.values():
            try:
                proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        self._remove_connection()

    def __enter__(self) -> LocalDeployment:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m labsupport.fl.deployment``: a SuperLink, N SuperNodes, one run, accuracy per round."""
    parser = argparse.ArgumentParser(
        prog="python -m labsupport.fl.deployment", description=main.__doc__
    )
    parser.add_argument("--num-supernodes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="num-server-rounds")
    parser.add_argument("--app-dir", default=str(DEFAULT_APP_DIR))
    parser.add_argument(
        "--run-dir", default=None, help="where logs and results go (default: a temp dir)"
    )
    parser.add_argument(
        "--run-config", default="", help="more overrides, e.g. 'lr=0.1 local-epochs=2'"
    )
    parser.add_argument("--quiet", action="store_true", help="do not stream the run's log")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds for the run")
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {"num-server-rounds": args.rounds}
    if args.run_config:
        overrides.update(tomllib.loads("\n".join(args.run_config.split())))
    start = time.perf_counter()
    with LocalDeployment(args.app_dir, args.num_supernodes, run_dir=args.run_dir) as deployment:
        print(
            f"SuperLink on {deployment.address}, {args.num_supernodes} SuperNodes; logs in {deployment.run_dir}"
        )
        for name, cmd in deployment.commands().items():
            print(f"  {name}: {subprocess.list2cmdline(cmd)}")
        results = deployment.run(overrides, stream=not args.quiet, timeout=args.timeout)
    print(f"\n{'round':>5}  {'accuracy':>8}  {'loss':>7}")
    for row in results["history"]:
        print(f"{row['round']:>5}  {row['accuracy']:>8.3f}  {row['loss']:>7.4f}")
    print(
        f"results: {results['config']['results-file']} ({time.perf_counter() - start:.1f} s in all)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
