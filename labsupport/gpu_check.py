"""``make gpu-check``: the course's prepared check on a CUDA machine (a GPU workstation or a Jetson).

No paper here: this is the CI of the GPU and Jetson paths (README, "CI on CPU, GPU and Jetson"; run by
``.github/workflows/ci-gpu.yml`` and ``ci-jetson.yml``). On a machine where torch sees a CUDA GPU it

1. installs the ``gpu`` extra (``pip install -e ".[gpu]"``: TensorRT, onnxruntime-gpu). This may fail
   -- TensorRT's libraries come from NVIDIA's own index -- and then says so in one line and goes on
   (``--skip-install`` skips it, e.g. on a Jetson whose L4T image ships TensorRT);
2. prints ``python -m labsupport.device`` (what the labs see) and keeps it;
3. runs ``make test-gpu`` (the tests marked ``gpu`` / ``jetson``) with a JUnit report, for the counts;
4. runs chapter 04's notebook through papermill in smoke mode with ``LAB_DEVICE=cuda``;
5. writes ``summary.json`` beside the logs in ``results/gpu_check/``: the device report, test counts
   (passed / failed / errors / skipped), the notebook's status and time, TensorRT's status and version,
   and every command that ran with its exit code and time.

Without a CUDA GPU it writes a summary that says so and exits with :data:`EXIT_NO_GPU` after one line
naming the reason: it never reports a CPU run as a GPU check. ``--dry-run`` prints and records the
commands without running any of them (status ``dry_run``), on any machine.
Exit codes: 0 all passed, :data:`EXIT_FAILED` a step failed, :data:`EXIT_NO_GPU` no CUDA GPU here.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = [
    "EXIT_FAILED",
    "EXIT_NO_GPU",
    "NOTEBOOK",
    "StepResult",
    "build_parser",
    "cuda_missing_reason",
    "junit_counts",
    "main",
    "notebook_outcome",
    "run_command",
    "run_gpu_check",
    "tensorrt_from_report",
]

EXIT_FAILED = 1
EXIT_NO_GPU = 3
NOTEBOOK = "notebooks/04_edge_optimization.ipynb"
SUMMARY_NAME = "summary.json"
INSTALL_HINT = (
    "TensorRT's libraries come from NVIDIA's index (pypi.nvidia.com), which must be reachable; "
    "install it by hand or use an image that ships it (README: GPU extras)"
)
# Seconds each step may take before it is stopped (the notebook is a smoke run: minutes at most).
TIMEOUTS = {"install_gpu_extra": 1200, "device_report": 300, "test_gpu": 1800, "notebook": 1800}

Echo = Callable[[str], None]


@dataclass
class StepResult:
    """One command that ran (or, in a dry run, would have): its exit code, time and log file."""

    name: str
    command: list[str]
    returncode: int | None
    seconds: float
    log: str | None = None
    timed_out: bool = False
    output: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0


Runner = Callable[[str, list[str], Mapping[str, str], Path | None, float], StepResult]


def cuda_missing_reason() -> str | None:
    """``None`` when torch sees a CUDA GPU, else one line saying why this is no GPU check."""
    import torch

    if torch.cuda.is_available():
        return None
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
    return (
        f"no CUDA GPU: torch {torch.__version__} ({build}) sees none; gpu-check runs only on a "
        "CUDA machine (on a CPU, `make test` is the check)"
    )


def run_command(
    name: str,
    command: list[str],
    env: Mapping[str, str],
    log_path: Path | None,
    timeout_s: float,
    *,
    cwd: Path | None = None,
    echo: Echo | None = None,
) -> StepResult:
    """Run ``command`` with ``env``, each output line echoed and written to ``log_path``.

    A command still running after ``timeout_s`` seconds is killed (``timed_out``). ``output`` keeps
    the whole of stdout and stderr (merged), for the steps whose output is parsed.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    start = time.monotonic()
    lines: list[str] = []
    log = open(log_path, "w", encoding="utf-8") if log_path is not None else None
    try:
        proc = subprocess.Popen(
            command,
            cwd=cwd,
            env=dict(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
        )
    except OSError as exc:
        if log is not None:
            log.write(f"could not start {command[0]}: {exc}\n")
            log.close()
        return StepResult(
            name,
            command,
            127,
            0.0,
            str(log_path) if log_path else None,
            False,
            f"could not start {command[0]}: {exc}",
        )
    timed_out = threading.Event()

    def _kill() -> None:
        timed_out.set()
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass

    timer = threading.Timer(timeout_s, _kill)
    timer.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if log is not None:
                log.write(line)
            if echo is not None:
                echo(line.rstrip("\n"))
        returncode = proc.wait()
    finally:
        timer.cancel()
        if log is not None:
            log.close()
    return StepResult(
        name=name,
        command=command,
        returncode=returncode,
        seconds=round(time.monotonic() - start, 2),
        log=str(log_path) if log_path is not None else None,
        timed_out=timed_out.is_set(),
        output="".join(lines),
    )


def junit_counts(path: Path) -> dict[str, int] | None:
    """Test counts from a pytest JUnit XML file (``None`` if it is missing or unreadable)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"total": 0, "failed": 0, "errors": 0, "skipped": 0}
    keys = {"total": "tests", "failed": "failures", "errors": "errors", "skipped": "skipped"}
    for suite in suites:
        for key, attr in keys.items():
            counts[key] += int(suite.get(attr, "0"))
    counts["passed"] = counts["total"] - counts["failed"] - counts["errors"] - counts["skipped"]
    return counts


def notebook_outcome(path: Path) -> dict:
    """From an executed notebook: the first error (name and value) and its lines about TensorRT."""
    try:
        nb = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return {"error": f"no executed notebook at {path}: {exc}", "tensorrt_lines": []}
    error = None
    trt_lines: list[str] = []
    for cell in nb.get("cells", []):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error" and error is None:
                error = f"{out.get('ename')}: {out.get('evalue')}"
            if out.get("output_type") == "stream" and out.get("name") == "stdout":
                text = out.get("text", "")
                text = "".join(text) if isinstance(text, list) else text
                trt_lines += [ln for ln in text.splitlines() if "TensorRT" in ln]
    return {"error": error, "tensorrt_lines": trt_lines}


def tensorrt_from_report(report: Mapping | None) -> dict:
    """TensorRT's status from a device report: usable, version (None if it does not import), detail."""
    if not report:
        return {"usable": False, "version": None, "detail": "no device report"}
    detail = str(report.get("tensorrt", ""))
    match = re.search(r"TensorRT (\d[\w.]*)", detail)
    return {
        "usable": bool(report.get("tensorrt_usable", False)),
        "version": match.group(1) if match else None,
        "detail": detail,
    }


def _json_object(text: str) -> dict | None:
    """The JSON object in a command's output (stderr is merged in: a warning may precede it)."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        return None
    try:
        value = json.loads(text[start : end + 1])
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _git_commit(repo: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def _make_test_gpu() -> list[str]:
    """``make test-gpu`` on *this* interpreter; ``STAMP=`` so that make never (re)installs anything."""
    return ["make", "test-gpu", f"PY={sys.executable}", f"VENV={sys.prefix}", "STAMP="]


def _child_env(extra: Mapping[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    # papermill's `python3` kernel and make's tools resolve through PATH: this interpreter first.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(extra)
    return env


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _write(summary: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / SUMMARY_NAME
    summary["summary_path"] = str(path)
    path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return path


def run_gpu_check(
    out_dir: Path | str,
    *,
    repo_root: Path | str | None = None,
    install: bool = True,
    dry_run: bool = False,
    notebook: str = NOTEBOOK,
    runner: Runner | None = None,
    cuda_probe: Callable[[], str | None] = cuda_missing_reason,
    echo: Echo | None = None,
) -> dict:
    """Run the GPU check (see the module docstring) and write ``out_dir/summary.json``.

    Returns the summary; ``summary["status"]`` is ``passed``, ``failed``, ``no_gpu`` or ``dry_run``.
    ``runner`` runs one command (default :func:`run_command`); ``cuda_probe`` returns why there is
    no GPU, or ``None``. Both are parameters so that the JSON written can be tested on a CPU.
    """
    out_dir = Path(out_dir).resolve()
    repo = Path(repo_root) if repo_root is not None else Path(__file__).resolve().parents[1]
    if not (repo / notebook).is_file():
        raise FileNotFoundError(f"notebook {notebook!r} not found under {repo}")
    say = echo or (lambda _line: None)
    if runner is None:

        def runner(name, command, env, log_path, timeout_s):
            return run_command(name, command, env, log_path, timeout_s, cwd=repo, echo=say)

    started, t0 = _now(), time.monotonic()
    summary: dict = {
        "schema": 1,
        "status": None,
        "reason": None,
        "started_at": started,
        "commit": _git_commit(repo),
        "warnings": [],
        "steps": [],
    }

    def finish(status: str) -> dict:
        summary["status"] = status
        summary["seconds"] = round(time.monotonic() - t0, 2)
        _write(summary, out_dir)
        return summary

    reason = cuda_probe()
    summary["gpu"] = {"cuda": reason is None, "reason": reason}
    if reason is not None and not dry_run:
        summary["reason"] = reason
        return finish("no_gpu")
    out_dir.mkdir(parents=True, exist_ok=True)

    def step(name: str, command: list[str], env: Mapping[str, str] | None = None) -> StepResult:
        say(f"gpu-check: {name}: {' '.join(command)}")
        if dry_run:
            result = StepResult(name, command, None, 0.0)
        else:
            log_path = out_dir / f"{name}.log"
            result = runner(name, command, _child_env(env or {}), log_path, TIMEOUTS[name])
        record = asdict(result)
        record.pop("output")
        summary["steps"].append(record)
        return result

    py = sys.executable
    if install:
        inst = step("install_gpu_extra", [py, "-m", "pip", "install", "-e", ".[gpu]"])
        installed = None if dry_run else inst.ok
        summary["gpu_extra"] = {"installed": installed, "seconds": inst.seconds}
        if not inst.ok and not dry_run:
            line = f"could not install the gpu extra (tensorrt, onnxruntime-gpu): {INSTALL_HINT}"
            say(f"gpu-check: {line}; going on without it")
            summary["warnings"].append(line)
    else:
        summary["gpu_extra"] = {"installed": None, "skipped": True}

    dev = step("device_report", [py, "-m", "labsupport.device"])
    report = _json_object(dev.output) if dev.ok else None
    summary["device"] = report
    summary["tensorrt"] = tensorrt_from_report(report)
    if report is not None and not summary["tensorrt"]["usable"]:
        summary["warnings"].append(
            f"TensorRT not usable ({summary['tensorrt']['detail']}): its tests and notebook rows skip"
        )

    junit = out_dir / "test-gpu.xml"
    if junit.exists():
        junit.unlink()  # never count a previous run's tests
    addopts = f"{os.environ.get('PYTEST_ADDOPTS', '')} --junitxml={shlex.quote(str(junit))}".strip()
    tests = step("test_gpu", _make_test_gpu(), {"PYTEST_ADDOPTS": addopts})
    counts = None if dry_run else junit_counts(junit)
    summary["tests"] = {
        "returncode": tests.returncode,
        "seconds": tests.seconds,
        "junit": str(junit),
        **(
            counts
            or {"total": None, "passed": None, "failed": None, "errors": None, "skipped": None}
        ),
    }
    if counts is not None and counts["total"] and counts["skipped"] == counts["total"]:
        summary["warnings"].append(f"all {counts['total']} GPU tests were skipped")

    executed = out_dir / Path(notebook).name
    if executed.exists():
        executed.unlink()
    nb_cmd = [py, "-m", "papermill", "--cwd", str(Path(notebook).parent), "--kernel", "python3"]
    nb_cmd += [notebook, str(executed)]
    nb_env = {"LAB_DEVICE": "cuda", "LAB_SMOKE": "1", "LAB_RESULTS_DIR": str(out_dir)}
    nb = step("notebook", nb_cmd, nb_env)
    summary["notebook"] = {
        "path": notebook,
        "executed": str(executed),
        "lab_device": "cuda",
        "smoke": True,
        "status": None if dry_run else ("passed" if nb.ok else "failed"),
        "seconds": nb.seconds,
        "returncode": nb.returncode,
        **({} if dry_run else notebook_outcome(executed)),
    }
    if dry_run:
        summary["reason"] = "dry run: nothing was run" + (f" ({reason})" if reason else "")
        return finish("dry_run")
    failed = [
        s["name"]
        for s in summary["steps"]
        if s["name"] != "install_gpu_extra" and s["returncode"] != 0
    ]
    if failed:
        summary["reason"] = "failed: " + ", ".join(failed)
        return finish("failed")
    return finish("passed")


def _one_line(summary: dict) -> str:
    status = summary["status"]
    if status in ("no_gpu", "dry_run"):
        return f"gpu-check: {summary['reason']}"
    tests, nb, trt = summary["tests"], summary["notebook"], summary["tensorrt"]
    return (
        f"gpu-check: {status}: tests {tests['passed']} passed / {tests['failed']} failed / "
        f"{tests['errors']} errors / {tests['skipped']} skipped; notebook {nb['status']} in "
        f"{nb['seconds']:.0f} s; TensorRT {trt['version'] or 'absent'} "
        f"({'usable' if trt['usable'] else 'not usable'}) -> {summary['summary_path']}"
    )


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m labsupport.gpu_check`` (``make gpu-check GPU_CHECK_ARGS=...``)."""
    parser = argparse.ArgumentParser(
        prog="python -m labsupport.gpu_check", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--out", default="results/gpu_check", help="folder for summary.json and logs"
    )
    parser.add_argument("--skip-install", action="store_true", help="do not install the gpu extra")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run none")
    parser.add_argument("--notebook", default=NOTEBOOK, help="notebook to run (repository path)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check from the command line; returns the exit code (0, EXIT_FAILED or EXIT_NO_GPU)."""
    args = build_parser().parse_args(argv)
    summary = run_gpu_check(
        args.out,
        install=not args.skip_install,
        dry_run=args.dry_run,
        notebook=args.notebook,
        echo=print,
    )
    for warning in summary["warnings"]:
        print(f"gpu-check: warning: {warning}")
    print(_one_line(summary))
    return {"passed": 0, "dry_run": 0, "no_gpu": EXIT_NO_GPU}.get(summary["status"], EXIT_FAILED)


if __name__ == "__main__":
    sys.exit(main())
