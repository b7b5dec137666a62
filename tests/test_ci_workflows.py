"""CI definitions and `make gpu-check`: the workflows are linted, the GPU check's refusals and JSON tested.

The GitHub Actions workflows (.github/workflows/) cannot run here, so they are checked as data: YAML
that parses, the keys GitHub requires, timeouts, runner labels, triggers, artifacts, and every `run:`
command's make targets and repository files, which must exist. The schema test and actionlint run
where installed. `labsupport.gpu_check` is tested on this CPU: its no-GPU refusal (one line, non-zero,
nothing run), and the summary JSON it writes, with a fake runner standing in for the GPU machine.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

yaml = pytest.importorskip("yaml")

from labsupport import gpu_check  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"
NAMES = ("ci-cpu.yml", "ci-gpu.yml", "ci-jetson.yml")
# Paths a workflow writes or makes, never expected in a checkout.
OUTPUTS = ("results", ".venv", ".ci-venv")
_FILE_SUFFIX = re.compile(r"\.(ipynb|sh|py|toml|ya?ml|cfg|txt|md|json)$")


# --- a small workflow linter (the GitHub rules these files must keep) -----------------------------


def load(path: Path) -> dict:
    """A workflow as a dict; YAML 1.1 reads the key `on` as True, so it is put back as "on"."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path.name}: a workflow must be a mapping, got {type(data).__name__}")
    if True in data:
        data["on"] = data.pop(True)
    return data


def makefile_targets(text: str) -> set[str]:
    """Names of the Makefile's rules (`name: ...` at the start of a line, not `name := ...`)."""
    targets: set[str] = set()
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z0-9_.%/-]+(?:[ \t]+[A-Za-z0-9_.%/-]+)*)[ \t]*:(?![=:])", line)
        if m:
            targets.update(m.group(1).split())
    return targets


def commands(script: str) -> list[list[str]]:
    """The simple commands of a `run:` script, as token lists (expressions `${{ }}` blanked)."""
    script = re.sub(r"\$\{\{.*?\}\}", "EXPR", script, flags=re.S)
    script = re.sub(r"\\\n", " ", script)
    out: list[list[str]] = []
    for line in script.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|()<>")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        current: list[str] = []
        for tok in lexer:
            if tok and set(tok) <= set(";&|()<>"):
                if current:
                    out.append(current)
                current = []
            else:
                current.append(tok)
        if current:
            out.append(current)
    return out


def _strip_keywords(cmd: list[str]) -> list[str]:
    """Drop shell keywords and leading VAR=value assignments: what remains starts with the program."""
    keywords = {"if", "then", "else", "elif", "fi", "!", "do", "done", "while", "until", "time"}
    i = 0
    while i < len(cmd) and (cmd[i] in keywords or re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", cmd[i])):
        i += 1
    return cmd[i:]


def repo_paths(cmd: list[str]) -> list[str]:
    """Tokens of a command that name a file of this repository (relative paths, not outputs)."""
    cmd = _strip_keywords(cmd)
    if not cmd or cmd[0] in {"echo", "printf"}:
        return []
    paths = []
    skip_next = False
    for tok in cmd[1:]:
        if skip_next:  # the code after `python -c`
            skip_next = False
            continue
        if tok == "-c":
            skip_next = True
            continue
        if tok.startswith(("-", "$", "/", "~", "http")) or "=" in tok or "EXPR" in tok:
            continue
        if "/" in tok or _FILE_SUFFIX.search(tok):
            if tok.rstrip("/").split("/")[0] in OUTPUTS:
                continue
            paths.append(tok)
    return paths


def make_targets(cmd: list[str]) -> list[str]:
    """The targets of a `make` command (flags and VAR=value arguments dropped)."""
    cmd = _strip_keywords(cmd)
    if not cmd or cmd[0] != "make":
        return []
    return [t for t in cmd[1:] if not t.startswith("-") and "=" not in t]


def lint_workflow(wf: dict, *, targets: set[str], root: Path) -> list[str]:
    """Everything wrong with one workflow, as messages (empty: it keeps every rule above)."""
    problems = []
    for key in ("name", "on", "jobs"):
        if key not in wf:
            problems.append(f"missing top-level key {key!r}")
    jobs = wf.get("jobs") or {}
    if not isinstance(jobs, dict) or not jobs:
        return [*problems, "no jobs"]
    for name, job in jobs.items():
        where = f"job {name!r}"
        for key in ("runs-on", "steps", "timeout-minutes"):
            if key not in job:
                problems.append(f"{where}: missing {key!r}")
        timeout = job.get("timeout-minutes")
        if timeout is not None and not (isinstance(timeout, int) and 0 < timeout <= 360):
            problems.append(
                f"{where}: timeout-minutes must be an integer in 1..360, got {timeout!r}"
            )
        labels = job.get("runs-on", [])
        labels = [labels] if isinstance(labels, str) else list(labels)
        if "self-hosted" in labels and not {"gpu", "jetson"} & set(labels):
            problems.append(f"{where}: a self-hosted job must carry the label gpu or jetson")
        steps = job.get("steps") or []
        if not steps:
            problems.append(f"{where}: no steps")
        for i, st in enumerate(steps):
            here = f"{where} step {i} ({st.get('name', st.get('uses', 'run'))})"
            if ("uses" in st) == ("run" in st):
                problems.append(f"{here}: needs exactly one of 'uses' and 'run'")
            if "uses" in st and not re.search(r"@v\d+", st["uses"]):
                problems.append(f"{here}: action {st['uses']!r} is not pinned to a major version")
            for cmd in commands(st.get("run", "")):
                for target in make_targets(cmd):
                    if target not in targets:
                        problems.append(f"{here}: make target {target!r} is not in the Makefile")
                for path in repo_paths(cmd):
                    if not (root / path).exists():
                        problems.append(f"{here}: {path!r} does not exist in the repository")
    return problems


@pytest.fixture(scope="module")
def targets() -> set[str]:
    return makefile_targets((ROOT / "Makefile").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def workflows() -> dict[str, dict]:
    return {name: load(WORKFLOWS / name) for name in NAMES}


def _runs(job: dict) -> str:
    return "\n".join(st.get("run", "") for st in job["steps"])


def _only_job(wf: dict) -> dict:
    (job,) = wf["jobs"].values()
    return job


# --- the linter itself, on workflows that break each rule ----------------------------------------


GOOD = """
name: t
on: push
jobs:
  a:
    runs-on: ubuntu-latest
    timeout-minutes: 5
    steps:
      - uses: actions/checkout@v4
      - run: make test && bash .ci/run
"""


def test_linter_accepts_a_good_workflow(targets):
    wf = yaml.safe_load(GOOD)
    wf["on"] = wf.pop(True)
    assert lint_workflow(wf, targets=targets, root=ROOT) == []


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda j: j.pop("timeout-minutes"), "missing 'timeout-minutes'"),
        (lambda j: j.update({"timeout-minutes": "5"}), "timeout-minutes must be an integer"),
        (lambda j: j.pop("runs-on"), "missing 'runs-on'"),
        (lambda j: j.update({"steps": []}), "no steps"),
        (lambda j: j.update({"runs-on": ["self-hosted", "linux"]}), "gpu or jetson"),
        (lambda j: j["steps"].append({"run": "make no-such-target"}), "'no-such-target'"),
        (lambda j: j["steps"].append({"run": "bash scripts/missing.sh"}), "'scripts/missing.sh'"),
        (lambda j: j["steps"].append({"run": "x=1 && make test lab-typo"}), "'lab-typo'"),
        (lambda j: j["steps"].append({"uses": "actions/checkout"}), "not pinned"),
        (lambda j: j["steps"].append({"uses": "a/b@v1", "run": "ls"}), "exactly one"),
    ],
)
def test_linter_rejects_each_broken_rule(edit, expected, targets):
    wf = yaml.safe_load(GOOD)
    wf["on"] = wf.pop(True)
    edit(wf["jobs"]["a"])
    problems = lint_workflow(wf, targets=targets, root=ROOT)
    assert any(expected in p for p in problems), problems


def test_linter_rejects_a_workflow_without_on_or_jobs(targets):
    assert "missing top-level key 'on'" in lint_workflow(
        {"name": "x", "jobs": {}}, targets=targets, root=ROOT
    )
    assert "no jobs" in lint_workflow({"name": "x", "on": "push"}, targets=targets, root=ROOT)


def test_command_parsing_finds_targets_and_files_but_not_outputs_or_variables():
    cmds = commands(
        "if ! command -v make; then apt-get install -y make; fi\n"
        'make gpu-check VENV="$VENV" GPU_CHECK_ARGS=--skip-install # trailing comment\n'
        'python -c "import a/b" && bash .ci/run ${{ vars.X }} results/gpu_check\n'
        'echo "not/a/file.py"'
    )
    flat = [t for c in cmds for t in make_targets(c)]
    assert flat == ["gpu-check"]
    assert [p for c in cmds for p in repo_paths(c)] == [".ci/run"]


def test_makefile_targets_are_read_from_rules_not_assignments():
    text = (
        "X := 1\nY ?= 2\nall: results\n.PHONY: a b\n$(STAMP): pyproject.toml\n\ttouch x:y\nb c: a\n"
    )
    assert makefile_targets(text) == {"all", ".PHONY", "b", "c"}


# --- the three workflows --------------------------------------------------------------------------


def test_each_workflow_parses_and_keeps_every_rule(workflows, targets):
    for name, wf in workflows.items():
        assert lint_workflow(wf, targets=targets, root=ROOT) == [], name


def test_the_cpu_job_is_the_readme_test_command_on_a_hosted_runner(workflows):
    job = _only_job(workflows["ci-cpu.yml"])
    assert job["runs-on"] == "ubuntu-latest"
    assert "3.11" in str(job.get("container", "")), (
        "Python 3.11, as the README says it is tested on"
    )
    assert any(cmd == ["bash", ".ci/run"] for cmd in commands(_runs(job)))
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    two_commands = readme.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    assert "`.ci/run`" in two_commands and "make test" in two_commands
    assert "make test" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    on = workflows["ci-cpu.yml"]["on"]
    assert "push" in on and "pull_request" in on


@pytest.mark.parametrize(
    ("name", "labels", "label"),
    [
        ("ci-gpu.yml", ["self-hosted", "linux", "x64", "gpu"], "ci:gpu"),
        ("ci-jetson.yml", ["self-hosted", "linux", "ARM64", "jetson"], "ci:jetson"),
    ],
)
def test_self_hosted_jobs_carry_their_labels_and_run_on_dispatch_main_or_a_label(
    workflows, name, labels, label
):
    wf = workflows[name]
    job = _only_job(wf)
    assert job["runs-on"] == labels
    on = wf["on"]
    assert "workflow_dispatch" in on
    assert on["push"]["branches"] == ["main"]
    assert on["pull_request"]["types"] == [
        "labeled"
    ]  # not `synchronize`: new commits need a new label
    assert f"github.event.label.name == '{label}'" in job["if"]
    assert "make gpu-check" in _runs(job)


def test_the_jetson_job_keeps_the_containers_torch(workflows):
    job = _only_job(workflows["ci-jetson.yml"])
    image = job["container"]["image"]
    assert "l4t-pytorch" in image and "vars.JETSON_IMAGE" in image
    assert "--runtime nvidia" in job["container"]["options"]
    runs = _runs(job)
    assert "--system-site-packages" in runs, "a plain venv hides the image's CUDA torch"
    assert "GPU_CHECK_ARGS=--skip-install" in runs


def test_gpu_check_arguments_in_workflows_are_accepted(workflows):
    for wf in workflows.values():
        for cmd in commands(_runs(_only_job(wf))):
            for tok in cmd:
                if tok.startswith("GPU_CHECK_ARGS="):
                    gpu_check.build_parser().parse_args(shlex.split(tok.split("=", 1)[1]))


def test_every_workflow_uploads_results_and_needs_no_secrets(workflows):
    for name, wf in workflows.items():
        job = _only_job(wf)
        uploads = [
            s for s in job["steps"] if s.get("uses", "").startswith("actions/upload-artifact@")
        ]
        assert len(uploads) == 1, name
        assert uploads[0]["with"]["path"] == "results/" and uploads[0]["if"] == "always()", name
        assert wf["permissions"] == {"contents": "read"}, name
        text = (WORKFLOWS / name).read_text(encoding="utf-8")
        assert not re.search(r"\$\{\{[^}]*\bsecrets\.", text), name


def test_workflows_match_githubs_schema():
    pytest.importorskip("check_jsonschema", reason="pip install check-jsonschema for the schema")
    import importlib.resources

    import jsonschema

    schema_file = (
        importlib.resources.files("check_jsonschema")
        / "builtin_schemas"
        / "vendor"
        / "github-workflows.json"
    )
    validator = jsonschema.Draft7Validator(json.loads(schema_file.read_text(encoding="utf-8")))
    for name in NAMES:
        wf = load(WORKFLOWS / name)
        assert not list(validator.iter_errors(wf)), name
    wf = load(WORKFLOWS / "ci-cpu.yml")
    _only_job(wf)["timeout-minute"] = 5  # the schema really checks: a typo is an error
    assert list(validator.iter_errors(wf))


def test_actionlint_finds_nothing():
    exe = shutil.which("actionlint")
    if exe is None:
        pytest.skip("actionlint is not installed (its PyPI wrapper downloads the binary at build)")
    files = [str(WORKFLOWS / n) for n in NAMES]
    out = subprocess.run([exe, *files], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


# --- make gpu-check -------------------------------------------------------------------------------


def test_make_gpu_check_runs_the_module_into_results(targets):
    assert {"gpu-check", "test-gpu"} <= targets
    if shutil.which("make") is None:
        pytest.skip("no make")
    out = subprocess.run(
        [
            "make",
            "--no-print-directory",
            "-n",
            "gpu-check",
            "STAMP=",
            "GPU_CHECK_ARGS=--skip-install",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert re.search(
        r"-m labsupport\.gpu_check --out results/gpu_check --skip-install$", out.stdout.strip()
    )


def test_without_a_gpu_it_refuses_in_one_line_and_runs_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def no_command(*args, **kwargs):
        raise AssertionError("no command may run without a GPU")

    monkeypatch.setattr(gpu_check, "run_command", no_command)
    (tmp_path / "summary.json").write_text('{"status": "passed"}')  # a stale success
    code = gpu_check.main(["--out", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    assert code == gpu_check.EXIT_NO_GPU != 0
    assert len(lines) == 1 and lines[0].startswith("gpu-check: no CUDA GPU")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "no_gpu" and summary["steps"] == []
    assert summary["reason"] in lines[0]


def test_cuda_probe_follows_torch(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert gpu_check.cuda_missing_reason() is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    reason = gpu_check.cuda_missing_reason()
    assert reason.startswith("no CUDA GPU") and "\n" not in reason and torch.__version__ in reason


def test_dry_run_lists_the_commands_and_runs_none(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "run_command", lambda *a, **k: pytest.fail("ran a command"))
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "dry_run"
    assert [s["name"] for s in summary["steps"]] == [
        "install_gpu_extra",
        "device_report",
        "test_gpu",
        "notebook",
    ]
    assert all(s["returncode"] is None for s in summary["steps"])
    assert summary["gpu_extra"]["installed"] is None and summary["notebook"]["status"] is None
    assert "papermill" in capsys.readouterr().out


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="{e}"
failures="{f}" skipped="{s}" tests="{t}" time="1.0"></testsuite></testsuites>"""


class FakeGpuMachine:
    """Stands in for the CUDA machine: answers each step as a GPU box would, records what it got."""

    def __init__(
        self, *, install_rc=0, tests=(6, 0, 0, 1), notebook_error=None, trt="TensorRT 10.3.0"
    ):
        self.install_rc, self.tests, self.notebook_error, self.trt = (
            install_rc,
            tests,
            notebook_error,
            trt,
        )
        self.calls: dict[str, tuple[list[str], dict]] = {}

    def __call__(self, name, command, env, log_path, timeout_s):
        self.calls[name] = (command, dict(env))
        rc, output = 0, ""
        if name == "install_gpu_extra":
            rc = self.install_rc
        elif name == "device_report":
            usable = self.trt.startswith("TensorRT ")
            output = "UserWarning: a line on stderr first\n" + json.dumps(
                {
                    "cuda_available": True,
                    "gpus": ["Fake GPU"],
                    "tensorrt_usable": usable,
                    "tensorrt": self.trt,
                }
            )
        elif name == "test_gpu":
            junit = re.search(r"--junitxml=(\S+)", env["PYTEST_ADDOPTS"]).group(1)
            t, f, e, s = self.tests
            Path(shlex.split(junit)[0]).write_text(JUNIT.format(t=t, f=f, e=e, s=s))
            rc = 1 if f or e else 0
        elif name == "notebook":
            outputs = [
                {
                    "output_type": "stream",
                    "name": "stdout",
                    "text": ["training device: cuda\n", "TensorRT usable: True; built=True\n"],
                }
            ]
            if self.notebook_error:
                outputs.append(
                    {
                        "output_type": "error",
                        "ename": "RuntimeError",
                        "evalue": self.notebook_error,
                        "traceback": [],
                    }
                )
                rc = 1
            Path(command[-1]).write_text(
                json.dumps({"cells": [{"cell_type": "code", "outputs": outputs}]})
            )
        return gpu_check.StepResult(name, command, rc, 0.5, str(log_path), False, output)


def _check(tmp_path, machine, **kwargs):
    return gpu_check.run_gpu_check(
        tmp_path / "out", runner=machine, cuda_probe=lambda: None, repo_root=ROOT, **kwargs
    )


def test_on_a_gpu_machine_the_summary_records_what_ran_and_its_numbers(tmp_path):
    machine = FakeGpuMachine()
    summary = _check(tmp_path, machine)
    assert summary == json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["status"] == "passed" and summary["reason"] is None
    expected = {"total": 6, "passed": 5, "failed": 0, "errors": 0, "skipped": 1}
    assert {k: summary["tests"][k] for k in expected} == expected
    assert summary["tensorrt"] == {"usable": True, "version": "10.3.0", "detail": "TensorRT 10.3.0"}
    assert summary["device"]["gpus"] == ["Fake GPU"]
    nb = summary["notebook"]
    assert nb["status"] == "passed" and nb["seconds"] == 0.5 and nb["lab_device"] == "cuda"
    assert nb["tensorrt_lines"] == ["TensorRT usable: True; built=True"]
    assert [s["name"] for s in summary["steps"]] == [
        "install_gpu_extra",
        "device_report",
        "test_gpu",
        "notebook",
    ]
    # what each command was given
    install_cmd, _ = machine.calls["install_gpu_extra"]
    assert install_cmd[-3:] == ["install", "-e", ".[gpu]"]
    test_cmd, _ = machine.calls["test_gpu"]
    assert test_cmd[:2] == ["make", "test-gpu"] and "STAMP=" in test_cmd  # never reinstalls
    nb_cmd, nb_env = machine.calls["notebook"]
    assert "papermill" in nb_cmd and gpu_check.NOTEBOOK in nb_cmd
    assert nb_env["LAB_DEVICE"] == "cuda" and nb_env["LAB_SMOKE"] == "1"


def test_a_failed_install_of_the_gpu_extra_is_said_and_not_fatal(tmp_path):
    summary = _check(
        tmp_path, FakeGpuMachine(install_rc=1, trt="not installed (ModuleNotFoundError)")
    )
    assert summary["status"] == "passed"
    assert summary["gpu_extra"]["installed"] is False
    assert any("NVIDIA's index" in w for w in summary["warnings"])
    assert summary["tensorrt"]["usable"] is False and summary["tensorrt"]["version"] is None


def test_failing_tests_or_notebook_fail_the_check_and_say_which(tmp_path):
    summary = _check(
        tmp_path, FakeGpuMachine(tests=(4, 1, 1, 0), notebook_error="CUDA out of memory")
    )
    assert summary["status"] == "failed" and summary["reason"] == "failed: test_gpu, notebook"
    assert (summary["tests"]["failed"], summary["tests"]["errors"], summary["tests"]["passed"]) == (
        1,
        1,
        2,
    )
    assert summary["notebook"]["error"] == "RuntimeError: CUDA out of memory"


def test_a_previous_runs_junit_is_never_counted(tmp_path):
    machine = FakeGpuMachine()
    out = tmp_path / "out"
    out.mkdir()
    (out / "test-gpu.xml").write_text(JUNIT.format(t=99, f=0, e=0, s=0))  # an old run's report

    def pytest_crashes(name, command, env, log_path, timeout_s):
        if name == "test_gpu":  # dies before writing its JUnit report
            return gpu_check.StepResult(name, command, 2, 0.1, str(log_path), False, "")
        return machine(name, command, env, log_path, timeout_s)

    summary = _check(tmp_path, pytest_crashes, install=False)
    assert summary["tests"]["total"] is None and summary["tests"]["returncode"] == 2
    assert summary["status"] == "failed" and summary["reason"] == "failed: test_gpu"
    assert summary["gpu_extra"] == {"installed": None, "skipped": True}
    assert "install_gpu_extra" not in machine.calls


def test_every_skipped_gpu_test_is_a_warning(tmp_path):
    summary = _check(tmp_path, FakeGpuMachine(tests=(3, 0, 0, 3)))
    assert "all 3 GPU tests were skipped" in summary["warnings"]


def test_junit_counts_by_hand(tmp_path):
    path = tmp_path / "j.xml"
    path.write_text(
        '<testsuites><testsuite tests="5" failures="1" errors="0" skipped="2"/>'
        '<testsuite tests="3" failures="0" errors="1" skipped="0"/></testsuites>'
    )
    assert gpu_check.junit_counts(path) == {
        "total": 8,
        "failed": 1,
        "errors": 1,
        "skipped": 2,
        "passed": 4,
    }
    path.write_text('<testsuite tests="0" failures="0" errors="0" skipped="0"/>')
    assert gpu_check.junit_counts(path)["total"] == 0
    path.write_text("<testsuite tests=")
    assert gpu_check.junit_counts(path) is None
    assert gpu_check.junit_counts(tmp_path / "missing.xml") is None


def test_tensorrt_version_is_read_from_the_device_report():
    read = gpu_check.tensorrt_from_report
    assert read({"tensorrt_usable": True, "tensorrt": "TensorRT 11.4.0.1"})["version"] == "11.4.0.1"
    broken = read(
        {"tensorrt_usable": False, "tensorrt": "TensorRT 10.0 imports but a Builder failed: x"}
    )
    assert broken == {"usable": False, "version": "10.0", "detail": broken["detail"]}
    assert (
        read({"tensorrt_usable": False, "tensorrt": "not installed (ImportError: x)"})["version"]
        is None
    )
    assert read(None)["usable"] is False


def test_run_command_logs_output_and_stops_a_command_that_runs_too_long(tmp_path):
    seen = []
    ok = gpu_check.run_command(
        "ok",
        [sys.executable, "-c", "print('a'); print('b')"],
        {},
        tmp_path / "ok.log",
        30,
        echo=seen.append,
    )
    assert ok.ok and ok.output == "a\nb\n" and seen == ["a", "b"]
    assert (tmp_path / "ok.log").read_text() == "a\nb\n"
    slow = gpu_check.run_command(
        "slow", [sys.executable, "-c", "import time; time.sleep(60)"], {}, None, 0.3
    )
    assert slow.timed_out and not slow.ok and slow.seconds < 30
    missing = gpu_check.run_command("x", ["/no/such/program"], {}, None, 5)
    assert missing.returncode == 127 and "could not start" in missing.output


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="timeout_s"):
        gpu_check.run_command("x", ["true"], {}, None, 0)
    with pytest.raises(FileNotFoundError, match="no_such.ipynb"):
        gpu_check.run_gpu_check(
            tmp_path, notebook="notebooks/no_such.ipynb", cuda_probe=lambda: None
        )
