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
JSON the ServerApp writes to its ``results-file``.

``secure=True`` (``--secure`` on the command line) is the recipe for real devices, on loopback
(issue 14): a throwaway CA and a SuperLink certificate for ``127.0.0.1``/``localhost``, one ECDSA
key pair per SuperNode (:mod:`labsupport.flower.certs`, private keys 0600); the SuperLink runs with
``--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile --enable-supernode-auth``; each public key is
registered with ``flwr supernode register <key>.pub <connection>``; each SuperNode runs with
``--root-certificates ca.pem --auth-supernode-private-key <key>``; the connection holds
``root-certificates`` instead of ``insecure``. :meth:`LocalDeployment.start_supernode` tries one
more node with other credentials, and a refused node is reported with the reason
(:func:`diagnose_supernode`: key not registered, CA not trusted, no TLS) -- never a hang. TLS
protects the channel and authentication decides who may join; neither is secure aggregation: the
server still sees every update.

An insecure SuperLink listens on loopback only; another ``host`` needs ``allow_insecure_remote=True``
and :attr:`LocalDeployment.exposure` says (and logs) what that exposes.

Offline and contained: every process gets :data:`labsupport.flower.processes.OFFLINE_ENV` (no
``uv sync`` at run time, no telemetry, no update check, Hugging Face offline), a project-local
``FLWR_HOME`` (``.flwr/`` in the repository, git-ignored) and this Python's ``bin/`` first on
``PATH``. Each process starts in its own process group and its log goes to a file in the run
directory. Flower detaches the SuperLink's ``flower-superexec`` into a session of its own, and a
SuperNode's ``flower-superexec`` outlives it, so :meth:`LocalDeployment.close` stops not only the
process groups it started but every process that carries this deployment's tag in its environment
(``LABSUPPORT_DEPLOYMENT``): SIGTERM, then SIGKILL after ``stop_timeout`` seconds -- also when a run
fails or raises.
"""

from __future__ import annotations

import argparse
import collections
import ipaddress
import json
import logging
import os
import shutil
import signal
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

from labsupport.fl.history import History

from .certs import DEFAULT_HOSTS, Credentials, make_credentials
from .processes import (
    OFFLINE_ENV,
    ProcessError,
    free_ports,
    port_open,
    signal_group,
    spawn,
    stop_group,
    tagged_pids,
    tail,
    wait_until,
)

try:
    import tomllib
except ImportError:  # Python 3.10: the same parser, as a package (a dependency of flwr)
    import tomli as tomllib

__all__ = ["DeploymentError", "LocalDeployment", "diagnose_supernode", "main"]

REPO = Path(__file__).resolve().parents[2]
DEFAULT_APP_DIR = REPO / "flower_app"
TAG = "LABSUPPORT_DEPLOYMENT"
LOOPBACK = "127.0.0.1"

logger = logging.getLogger("labsupport.flower")


class DeploymentError(ProcessError):
    """A process of the deployment failed to start, died, or a run did not complete."""


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_exposure(host: str, secure: bool, allow_insecure_remote: bool) -> str:
    """What listening on ``host`` exposes ("" on loopback); refuses an insecure remote bind."""
    if _is_loopback(host):
        return ""
    if secure:
        return (
            f"the SuperLink listens on {host}: any machine that can reach it can open a TLS "
            "connection, but only SuperNodes whose public keys were registered can join; the "
            "Control API (flwr run, flwr supernode register) has no user authentication in this "
            "setup, so anyone who can reach the port can submit runs and register keys"
        )
    message = (
        f"INSECURE: the SuperLink listens on {host} without TLS or SuperNode authentication. "
        "Anyone who can reach this port can join as a SuperNode (and receive the global model and "
        "the run configuration, and send back any update), read every model and update in transit, "
        "and submit runs (flwr run) whose code then executes on every SuperNode"
    )
    if not allow_insecure_remote:
        raise ValueError(
            f"refusing to bind an insecure SuperLink to {host!r} (not loopback): use secure=True "
            f"(TLS + SuperNode authentication), host='127.0.0.1', or allow_insecure_remote=True "
            f"if you accept this: {message}"
        )
    return message


_PLAIN_TO_TLS = (
    "the SuperLink closed the connection: the SuperNode speaks plain HTTP (--insecure) but "
    "the SuperLink requires TLS"
)

#: What a SuperNode's log says when it is refused, and what that means.
_REFUSALS = (
    (
        ("Failed to activate SuperNode", "[code: 2004]", "[code: 2001]"),
        "the SuperLink refused its public key: the key is not registered "
        "(register it with `flwr supernode register <key>.pub <connection>`)",
    ),
    (
        ("CERTIFICATE_VERIFY_FAILED",),
        "the TLS handshake failed: the SuperNode does not trust the SuperLink's certificate "
        "(its --root-certificates is another CA's, or the certificate does not name the address "
        "it dials)",
    ),
    (
        # A TLS SuperLink answers a plain-HTTP request by closing the connection or by resetting
        # it; which one the node sees depends on timing (both were seen here).
        ("Server disconnected without sending a response", "Connection reset by peer"),
        _PLAIN_TO_TLS,
    ),
    (
        ("Exit Code: 303",),
        "the SuperNode has an authentication key but no TLS (--insecure): Flower refuses that",
    ),
    (
        ("Connection refused", "ConnectError"),
        "nothing accepts connections at the SuperLink's address (is it running, right port?)",
    ),
)


def diagnose_supernode(log_text: str, *, superlink_tls: bool | None = None) -> str:
    """Why a SuperNode could not join, read from its log (a generic reason if no pattern fits).

    ``superlink_tls`` is what the caller knows of the SuperLink (True: it requires TLS). A node
    started with ``--insecure`` that failed to connect to such a SuperLink is diagnosed as speaking
    plain HTTP even when its log stops before the connection error is written out (seen in CI: the
    node exited after its first retry warning, with no error line).
    """
    for needles, reason in _REFUSALS:
        if any(n in log_text for n in needles):
            return reason
    if (
        superlink_tls
        and "Option `--insecure` was set" in log_text
        and "Connection attempt failed" in log_text
    ):
        return _PLAIN_TO_TLS
    return "it did not report a SuperNode ID (see its log)"


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
    """A SuperLink and ``num_supernodes`` SuperNodes on this machine; use as a context manager.

    ``app_dir`` is the Flower app (default: the repository's ``flower_app``); ``flwr_home`` defaults
    to ``.flwr/`` in the repository; ``superlink_port`` and the SuperNodes' ``supernode_ports``
    (their ClientAppIo/runtime API) are picked free if not given; logs go to ``run_dir`` (a new
    temporary directory if not given). ``startup_timeout`` bounds the wait for the SuperLink's
    port and each SuperNode's registration; ``stop_timeout`` the grace between SIGTERM and SIGKILL.

    ``secure=True``: a throwaway CA, a SuperLink certificate whose SANs cover ``127.0.0.1``,
    ``localhost`` and ``host``, and one SuperNode key pair per node are written to
    ``run_dir/credentials`` (:func:`labsupport.flower.certs.make_credentials`); the SuperLink runs
    with TLS and ``--enable-supernode-auth``; every SuperNode's public key is registered with
    ``flwr supernode register`` before the node starts with ``--root-certificates`` and
    ``--auth-supernode-private-key``; ``flwr`` reaches the SuperLink over TLS.

    ``host`` is where the SuperLink listens. Without TLS only a loopback address is allowed, unless
    ``allow_insecure_remote=True``; then :attr:`exposure` says what that exposes (also logged as a
    warning). The SuperNodes always listen on 127.0.0.1.

    State: the processes it started, their log files, the connection name it wrote, the credentials.
    """

    def __init__(
        self,
        app_dir: str | os.PathLike = DEFAULT_APP_DIR,
        num_supernodes: int = 2,
        *,
        secure: bool = False,
        flwr_home: str | os.PathLike | None = None,
        superlink_port: int | None = None,
        supernode_ports: Sequence[int] | None = None,
        run_dir: str | os.PathLike | None = None,
        host: str = "127.0.0.1",
        allow_insecure_remote: bool = False,
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
        self.secure = bool(secure)
        self.host = host
        self.exposure = _check_exposure(host, self.secure, allow_insecure_remote)
        self.flwr_home = Path(flwr_home) if flwr_home is not None else REPO / ".flwr"
        ports = free_ports(1 + num_supernodes, LOOPBACK)
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
        self.credentials: Credentials | None = None
        self.processes: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self.started_pids: set[int] = set()
        self._extra_env = dict(env or {})
        self._runs = 0
        if self.exposure:
            logger.warning("%s", self.exposure)

    # ------------------------------------------------------------------------------- start
    @property
    def address(self) -> str:
        """The SuperLink's address as the SuperNodes and ``flwr`` on this machine dial it."""
        dial = LOOPBACK if self.host in ("0.0.0.0", "::", "") else self.host
        return f"{dial}:{self.superlink_port}"

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

    def _credentials(self) -> Credentials:
        if self.credentials is None:
            hosts = list(DEFAULT_HOSTS)
            if self.host not in hosts and self.host not in ("0.0.0.0", "::", ""):
                hosts.append(self.host)
            self.credentials = make_credentials(
                self.run_dir / "credentials", self.num_supernodes, hosts=hosts
            )
        return self.credentials

    def superlink_command(self) -> list[str]:
        """``flower-superlink`` with TLS and node authentication, or ``--insecure``."""
        if self.secure:
            creds = self._credentials()
            security = [
                "--ssl-ca-certfile", str(creds.ca_certificate),
                "--ssl-certfile", str(creds.server_certificate),
                "--ssl-keyfile", str(creds.server_key),
                "--enable-supernode-auth",
            ]  # fmt: skip
        else:
            security = ["--insecure"]
        return [
            self._tool("flower-superlink"),
            *security,
            "--disable-runtime-dependency-installation",
            "--host", self.host,
            "--port", str(self.superlink_port),
        ]  # fmt: skip

    def supernode_command(
        self,
        partition_id: int,
        port: int,
        *,
        private_key: str | os.PathLike | None = None,
        root_certificates: str | os.PathLike | None = None,
        insecure: bool = False,
    ) -> list[str]:
        """``flower-supernode`` for ``partition_id``: ``--insecure``, or TLS trusting
        ``root_certificates`` and signing with ``private_key`` (each omitted if None)."""
        security: list[str] = []
        if insecure:
            security.append("--insecure")
        if root_certificates is not None:
            security += ["--root-certificates", str(root_certificates)]
        if private_key is not None:
            security += ["--auth-supernode-private-key", str(private_key)]
        return [
            self._tool("flower-supernode"),
            *security,
            "--superlink", self.address,
            "--host", LOOPBACK,
            "--port", str(port),
            "--node-config", f"partition-id={partition_id} num-partitions={self.num_supernodes}",
        ]  # fmt: skip

    def commands(self) -> dict[str, list[str]]:
        """The command line of every long-running process, by name."""
        cmds = {"superlink": self.superlink_command()}
        for i, port in enumerate(self.supernode_ports):
            if self.secure:
                creds = self._credentials()
                cmds[f"supernode-{i}"] = self.supernode_command(
                    i,
                    port,
                    root_certificates=creds.ca_certificate,
                    private_key=creds.node_private_keys[i],
                )
            else:
                cmds[f"supernode-{i}"] = self.supernode_command(i, port, insecure=True)
        return cmds

    def start(self) -> LocalDeployment:
        """Start the SuperLink, wait for its port, (register the node keys,) start the SuperNodes,
        wait for each to connect. Any failure stops everything and raises :class:`DeploymentError`
        with the reason and the log."""
        if self.processes:
            raise RuntimeError("this deployment is already started")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        try:
            cmds = self.commands()
            self._spawn("superlink", cmds.pop("superlink"))
            self._wait(
                "superlink",
                lambda: port_open(self.address.rsplit(":", 1)[0], self.superlink_port),
                f"open its port {self.superlink_port}",
            )
            self._write_connection()
            if self.secure:
                assert self.credentials is not None
                for i, key in enumerate(self.credentials.node_public_keys):
                    self.register_supernode(key, name=f"supernode-{i}")
            for name, cmd in cmds.items():
                self._spawn(name, cmd)
            for name in cmds:
                self._wait_for_supernode(name)
        except BaseException:
            self.close()
            raise
        return self

    def register_supernode(self, public_key: str | os.PathLike, *, name: str) -> str:
        """``flwr supernode register <public_key> <connection> --name <name>``; returns its output.

        Only for a secure deployment (the SuperLink accepts only registered keys). Raises
        :class:`DeploymentError` with flwr's message if the registration fails.
        """
        if not self.secure:
            raise RuntimeError("SuperNode registration needs secure=True (TLS + node auth)")
        cmd = [
            self._tool("flwr"), "supernode", "register", str(public_key), self.connection,
            "--name", name,
        ]  # fmt: skip
        out = self._run_flwr(cmd)
        text = (out.stdout + out.stderr).strip()
        with open(self.run_dir / "register.log", "a") as fh:
            fh.write(f"$ {subprocess.list2cmdline(cmd)}\n{text}\n")
        if out.returncode != 0 or "registered successfully" not in text:
            raise DeploymentError(
                f"registering {name}'s public key failed (exit {out.returncode}):\n{text}"
            )
        return text

    def supernodes(self) -> list[dict[str, Any]]:
        """``flwr supernode list <connection> --format json``: the SuperLink's nodes and statuses."""
        cmd = [self._tool("flwr"), "supernode", "list", self.connection, "--format", "json"]
        out = self._run_flwr(cmd)
        try:
            payload = json.loads(out.stdout[out.stdout.index("{") :])
        except ValueError:
            raise DeploymentError(
                f"`flwr supernode list` failed (exit {out.returncode}):\n{out.stdout}{out.stderr}"
            ) from None
        return list(payload.get("nodes", []))

    def start_supernode(
        self,
        name: str,
        *,
        partition_id: int = 0,
        private_key: str | os.PathLike | None = None,
        root_certificates: str | os.PathLike | None = None,
        insecure: bool = False,
        max_retries: int = 2,
        timeout: float | None = None,
    ) -> subprocess.Popen:
        """Start one more SuperNode with the given credentials and wait until it has connected.

        For trying what the SuperLink accepts: a node with an unregistered key, one that trusts
        another CA, one without TLS. The node gives up after ``max_retries`` failed connection
        attempts (``--max-retries``; without it a node that gets no answer, e.g. one speaking plain
        HTTP to a TLS SuperLink, retries forever). If the node is refused, its process group is
        stopped and :class:`DeploymentError` says why (see :func:`diagnose_supernode`) -- within
        ``timeout`` seconds (default ``startup_timeout``), never a hang.
        """
        if "superlink" not in self.processes:
            raise RuntimeError("start the deployment first")
        if name in self.processes:
            raise ValueError(f"a process named {name!r} already exists")
        (port,) = free_ports(1, LOOPBACK)
        cmd = self.supernode_command(
            partition_id,
            port,
            private_key=private_key,
            root_certificates=root_certificates,
            insecure=insecure,
        )
        cmd += ["--max-retries", str(int(max_retries))]
        proc = self._spawn(name, cmd)
        try:
            self._wait_for_supernode(name, timeout=timeout)
        except DeploymentError:
            stop_group(proc, self.stop_timeout)
            raise
        return proc

    def _wait_for_supernode(self, name: str, timeout: float | None = None) -> None:
        """Wait until SuperNode ``name`` logs its node id; raise with the diagnosis if it exits."""
        log, proc = self.logs[name], self.processes[name]
        deadline = time.monotonic() + (self.startup_timeout if timeout is None else timeout)
        while "SuperNode ID:" not in tail(log, 400):
            if proc.poll() is not None:
                raise DeploymentError(
                    f"{name} could not join the federation (exit code {proc.returncode}): "
                    f"{self._why(log)}. Its log {log} ends:\n{tail(log, 12)}"
                )
            link = self.processes["superlink"]
            if link.poll() is not None:
                raise DeploymentError(
                    f"the SuperLink exited with code {link.returncode} while {name} was "
                    f"connecting; its log ends:\n{tail(self.logs['superlink'])}"
                )
            if time.monotonic() > deadline:
                raise DeploymentError(
                    f"{name} did not connect within "
                    f"{self.startup_timeout if timeout is None else timeout:g} s: "
                    f"{self._why(log)}. Its log {log} ends:\n{tail(log, 12)}"
                )
            time.sleep(0.2)

    def _why(self, log: Path) -> str:
        """Why the SuperNode that writes ``log`` did not join (see :func:`diagnose_supernode`)."""
        return diagnose_supernode(tail(log, 400), superlink_tls=self.secure)

    def _run_flwr(self, cmd: list[str]) -> subprocess.CompletedProcess:
        """Run a short ``flwr`` command in this deployment's environment (wide output, no stdin)."""
        return subprocess.run(
            cmd,
            env={**self.environment(), "COLUMNS": "200"},
            cwd=self.run_dir,
            capture_output=True,
            text=True,
            timeout=self.startup_timeout,
            stdin=subprocess.DEVNULL,
        )

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
        proc = spawn(cmd, log, env=self.environment(), cwd=self.run_dir)
        self.processes[name], self.logs[name] = proc, log
        self.started_pids.add(proc.pid)
        return proc

    def _wait(self, name: str, ready: Callable[[], bool], what: str) -> None:
        """Poll ``ready`` until true; raise with the log tail of any process that died meanwhile."""
        try:
            wait_until(
                ready,
                what=f"{name} to {what}",
                timeout=self.startup_timeout,
                log=self.logs[name],
                watch={n: (p, self.logs[n]) for n, p in self.processes.items()},
            )
        except ProcessError as exc:
            raise DeploymentError(str(exc)) from None

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
        entry: dict[str, Any] = {"address": self.address}
        if self.secure:
            assert self.credentials is not None
            entry["root-certificates"] = str(self.credentials.ca_certificate.resolve())
        else:
            entry["insecure"] = True
        config.setdefault("superlink", {})[self.connection] = entry
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

        The JSON's per-round rows are under ``"rows"`` (round 0 = the initial model), and
        ``"history"`` is :meth:`labsupport.fl.history.History.from_flower` of them (rounds 1..T).

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
        last_lines: collections.deque[str] = collections.deque(maxlen=40)
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
                    last_lines.append(line)
                    if stream:
                        emit(line)

            reader = threading.Thread(target=pump, daemon=True)
            reader.start()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                stop_group(proc, self.stop_timeout)
                reader.join(5)
                raise TimeoutError(
                    f"`flwr run` did not finish within {timeout:g} s; last lines:\n"
                    + "\n".join(last_lines)
                ) from None
            reader.join(10)
        if proc.returncode != 0:
            raise DeploymentError(
                f"`{subprocess.list2cmdline(cmd)}` exited with code {proc.returncode}; last lines:\n"
                + "\n".join(last_lines)
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
                + "\n".join(last_lines)
                + f"\nSuperLink log ({self.logs['superlink']}) ends:\n{tail(self.logs['superlink'], 15)}"
            )
        payload["rows"] = payload["history"]
        payload["history"] = History.from_flower(payload["rows"])
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
        return sorted(pids | set(tagged_pids(TAG, self.token)))

    def close(self) -> None:
        """Stop every process started here: SIGTERM to each process group and tagged process, then
        SIGKILL to whatever is left after ``stop_timeout`` s. Safe to call twice."""
        for sig, grace in ((signal.SIGTERM, self.stop_timeout), (signal.SIGKILL, 5.0)):
            for proc in self.processes.values():
                signal_group(proc, sig)
            for pid in tagged_pids(TAG, self.token):
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
    """``python -m labsupport.flower.deployment``: a SuperLink, N SuperNodes, one run, accuracy per round."""
    parser = argparse.ArgumentParser(
        prog="python -m labsupport.flower.deployment", description=main.__doc__
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
    parser.add_argument(
        "--secure",
        action="store_true",
        help="TLS with a throwaway CA, SuperNode keys registered with `flwr supernode register`",
    )
    parser.add_argument("--host", default=LOOPBACK, help="where the SuperLink listens")
    parser.add_argument(
        "--allow-insecure-remote",
        action="store_true",
        help="allow an insecure SuperLink on a non-loopback --host (prints what it exposes)",
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds for the run")
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {"num-server-rounds": args.rounds}
    if args.run_config:
        overrides.update(tomllib.loads("\n".join(args.run_config.split())))
    start = time.perf_counter()
    deployment = LocalDeployment(
        args.app_dir,
        args.num_supernodes,
        run_dir=args.run_dir,
        secure=args.secure,
        host=args.host,
        allow_insecure_remote=args.allow_insecure_remote,
    )
    if deployment.exposure:
        print(f"WARNING: {deployment.exposure}")
    with deployment:
        mode = "TLS + SuperNode auth" if deployment.secure else "insecure"
        print(
            f"SuperLink on {deployment.address} ({mode}), {args.num_supernodes} SuperNodes; "
            f"logs in {deployment.run_dir}"
        )
        for name, cmd in deployment.commands().items():
            print(f"  {name}: {subprocess.list2cmdline(cmd)}")
        results = deployment.run(overrides, stream=not args.quiet, timeout=args.timeout)
    print(f"\n{'round':>5}  {'accuracy':>8}  {'loss':>7}")
    for row in results["rows"]:
        print(f"{row['round']:>5}  {row['accuracy']:>8.3f}  {row['loss']:>7.4f}")
    print(
        f"results: {results['config']['results-file']} ({time.perf_counter() - start:.1f} s in all)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
