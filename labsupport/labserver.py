"""JupyterLab for the labs: offline, quiet, and on the project's own Python.

No paper here: this is the course's tooling. ``make lab`` runs ``python -m labsupport.labserver
notebooks/``, and the browser test (``tests/browser/``) starts an isolated :class:`LabServer` on
loopback. Both read the configuration kept in the repository's ``jupyter/`` folder:

- ``jupyter/jupyter_server_config.json`` (found through ``$JUPYTER_CONFIG_PATH``): no news feed, no
  update check, a read-only extension manager (no PyPI listing), loopback only, kernel ``python3``;
- ``jupyter/labconfig/page_config.json``: no "build recommended" prompt;
- ``jupyter/lab/settings/overrides.json`` (``--LabApp.app_settings_dir``): default settings with no
  news question on first start, and every notebook cell rendered (no windowing).

The notebooks' kernelspec is ``python3``. ``$JUPYTER_PREFER_ENV_PATH=1`` makes the server find the
``python3`` kernel installed in the project's environment before any in the user's home, and
jupyter_client starts a kernel whose command is ``python`` with the server's own interpreter: the
kernel is the project's environment.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = [
    "CONFIG_DIR",
    "LabServer",
    "free_port",
    "lab_command",
    "lab_environment",
    "main",
]

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "jupyter"
APP_SETTINGS_DIR = CONFIG_DIR / "lab" / "settings"

# Variables a test run sets for itself that would change what a student sees in a kernel:
# MPLBACKEND=Agg hides inline plots, TQDM_DISABLE hides progress bars.
_TEST_ONLY_VARIABLES = ("MPLBACKEND", "TQDM_DISABLE")
_RUN_ID_VARIABLE = "LABSUPPORT_LABSERVER_RUN"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def lab_environment(
    base: Mapping[str, str] | None = None,
    *,
    isolated_dir: Path | None = None,
    smoke: bool = False,
) -> dict[str, str]:
    """The environment for a JupyterLab server (and, inherited, its kernels).

    ``base`` defaults to ``os.environ``. With ``isolated_dir`` every directory JupyterLab reads or
    writes for a user (config, data, runtime, settings, workspaces) lies under it, so nothing of the
    user's own setup is read and nothing is left behind. ``smoke`` sets ``LAB_SMOKE=1`` for the
    kernels. The repository's ``jupyter/`` folder goes first on ``$JUPYTER_CONFIG_PATH``.
    """
    env = dict(os.environ if base is None else base)
    for name in (*_TEST_ONLY_VARIABLES, _RUN_ID_VARIABLE):
        env.pop(name, None)
    extra = env.get("JUPYTER_CONFIG_PATH", "")
    env["JUPYTER_CONFIG_PATH"] = os.pathsep.join(p for p in (str(CONFIG_DIR), extra) if p)
    env["JUPYTER_PREFER_ENV_PATH"] = "1"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    if smoke:
        env["LAB_SMOKE"] = "1"
    if isolated_dir is not None:
        root = Path(isolated_dir)
        dirs = {
            "JUPYTER_CONFIG_DIR": root / "config",
            "JUPYTER_DATA_DIR": root / "data",
            "JUPYTER_RUNTIME_DIR": root / "runtime",
            "JUPYTERLAB_SETTINGS_DIR": root / "settings",
            "JUPYTERLAB_WORKSPACES_DIR": root / "workspaces",
            "IPYTHONDIR": root / "ipython",
            "MPLCONFIGDIR": root / "matplotlib",
        }
        for name, path in dirs.items():
            path.mkdir(parents=True, exist_ok=True)
            env[name] = str(path)
    return env


def lab_command(
    root_dir: Path,
    *,
    python: str = sys.executable,
    port: int | None = None,
    token: str | None = None,
    open_browser: bool = True,
    expose_app: bool = False,
) -> list[str]:
    """The command line that starts JupyterLab on ``root_dir`` with the repository's settings."""
    cmd = [
        python,
        "-m",
        "jupyterlab",
        f"--ServerApp.root_dir={Path(root_dir).resolve()}",
        f"--LabApp.app_settings_dir={APP_SETTINGS_DIR}",
    ]
    if port is not None:
        cmd += [f"--port={int(port)}", "--port-retries=0"]
    if token is not None:
        cmd.append(f"--IdentityProvider.token={token}")
    if not open_browser:
        cmd.append("--no-browser")
    if expose_app:
        cmd.append("--LabApp.expose_app_in_browser=True")
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # containers and CI run as root
        cmd.append("--allow-root")
    return cmd


class LabServer:
    """A JupyterLab server on 127.0.0.1 with a random token and its own temporary directories.

    Use as a context manager; :meth:`stop` shuts the server down through its API, then ends the
    server's process group and every process it started -- kernels run in sessions of their own, and
    what a kernel starts may be re-parented; :meth:`processes` finds them all by a marker in their
    environment -- by process id; :attr:`leftover` lists those still alive afterwards (it should be
    empty).
    """

    def __init__(
        self,
        root_dir: Path,
        *,
        smoke: bool = False,
        env: Mapping[str, str] | None = None,
        workdir: Path | None = None,
        log_path: Path | None = None,
    ) -> None:
        root_dir = Path(root_dir)
        if not root_dir.is_dir():
            raise ValueError(
                f"root_dir {root_dir} is not a directory; expected the notebooks' folder"
            )
        self.root_dir = root_dir.resolve()
        self.smoke = smoke
        self._base_env = env
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._workdir = workdir
        self._log_path = log_path
        self.port = free_port()
        self.token = secrets.token_hex(24)
        # Marks the environment of the server and of everything it starts (kernels, and what they
        # start, such as Ray's processes), so that stop() finds them even once re-parented.
        self.run_id = secrets.token_hex(8)
        self.proc: subprocess.Popen | None = None
        self.known_pids: set[int] = set()
        self.leftover: list[int] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def api(self, path: str, method: str = "GET", timeout: float = 10.0):
        """Call the server's REST API (``/api/...``) with the token; returns the decoded JSON."""
        req = urllib.request.Request(
            f"{self.url}{path}",
            method=method,
            headers={"Authorization": f"token {self.token}"},
            data=b"" if method == "POST" else None,
        )
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
        return json.loads(body) if body else None

    def start(self, timeout: float = 120.0) -> LabServer:
        """Start the server and wait until ``/api/status`` answers."""
        if self.proc is not None:
            raise RuntimeError("this LabServer was already started")
        if self._workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="labserver-")
            self._workdir = Path(self._tmp.name)
        env = lab_environment(self._base_env, isolated_dir=self._workdir, smoke=self.smoke)
        env[_RUN_ID_VARIABLE] = self.run_id
        cmd = lab_command(
            self.root_dir, port=self.port, token=self.token, open_browser=False, expose_app=True
        )
        log = open(self._log_path or self._workdir / "server.log", "ab")
        self._log = log
        self.proc = subprocess.Popen(
            [*cmd, "--ServerApp.ip=127.0.0.1"],
            cwd=self.root_dir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"JupyterLab exited with code {self.proc.returncode} before it was ready; "
                    f"log: {self.log_text()[-3000:]}"
                )
            with contextlib.suppress(OSError, ValueError):
                self.api("/api/status", timeout=2.0)
                return self
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"JupyterLab did not answer on {self.url} within {timeout} s")

    def log_text(self) -> str:
        """The server's log so far."""
        path = self._log_path or (self._workdir / "server.log" if self._workdir else None)
        return path.read_text(errors="replace") if path and path.exists() else ""

    def processes(self) -> list[int]:
        """Ids of the running processes started by this server, its kernels and their children."""
        import psutil

        found = []
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if proc.environ().get(_RUN_ID_VARIABLE) == self.run_id and _alive(proc.pid):
                    found.append(proc.pid)
        return found

    def remember_children(self) -> set[int]:
        """Record the server's child processes (its kernels) so that :meth:`stop` can end them."""
        if self.proc is None:
            return set()
        import psutil

        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                self.known_pids.add(child.pid)
        return set(self.known_pids)

    def stop(self, timeout: float = 20.0) -> list[int]:
        """Shut down kernels and server; return (and keep in :attr:`leftover`) pids still alive."""
        if self.proc is None:
            return []
        import psutil

        self.remember_children()
        self.known_pids.update(self.processes())
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                for kernel in self.api("/api/kernels") or []:
                    self.api(f"/api/kernels/{kernel['id']}", method="DELETE", timeout=timeout)
            with contextlib.suppress(OSError, ValueError):
                self.api("/api/shutdown", method="POST")
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(timeout=5)
        self.known_pids.update(self.processes())
        survivors = []
        for pid in sorted(self.known_pids):
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                proc.terminate()
                survivors.append(proc)
        _, alive = psutil.wait_procs(survivors, timeout=5)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=5)
        self.leftover = sorted(
            {pid for pid in [self.proc.pid, *self.known_pids] if _alive(pid)}
            | set(self.processes())
        )
        self._log.close()
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                self._tmp.cleanup()
            self._tmp = None
        return self.leftover

    def __enter__(self) -> LabServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _alive(pid: int) -> bool:
    """True while ``pid`` is a running (not zombie) process."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m labsupport.labserver [FOLDER] [jupyter lab options]``: JupyterLab for the labs."""
    args = list(sys.argv[1:] if argv is None else argv)
    root = Path(args.pop(0)) if args and not args[0].startswith("-") else Path("notebooks")
    if not root.is_dir():
        raise SystemExit(f"{root} is not a folder; expected the notebooks' folder (notebooks/)")
    cmd = [*lab_command(root), *args]
    os.execve(cmd[0], cmd, lab_environment())


if __name__ == "__main__":
    main()
