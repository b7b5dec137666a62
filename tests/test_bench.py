from __future__ import annotations

import json
import subprocess
import sys

import pytest

from labsupport import bench, report
from labsupport.bench import Result, Target


def test_target_bounds():
    assert Target("r", max=1.2).met(1.2) and not Target("r", max=1.2).met(1.3)
    assert Target("s", min=5).met(7) and not Target("s", min=5).met(float("nan"))
    assert Target("g", -1, 1).met(0.5) and not Target("g", -1, 1).met(-1.5)
    assert Target("g", -1, 1).describe() == "-1 <= g <= 1"


def test_result_json_pairs_each_target_with_its_figure():
    payload = Result({"ratio": 1.1, "other": 3.0}, {"ratio": Target("ratio", max=1.2)}).to_json()
    assert payload["figures"] == {"ratio": 1.1, "other": 3.0}
    assert payload["targets"]["ratio"]["value"] == 1.1 and payload["targets"]["ratio"]["met"]
    assert payload["met"] == {"ratio": True}


def test_a_target_on_a_missing_figure_is_an_error():
    with pytest.raises(KeyError, match="speedup"):
        Result({"ratio": 1.0}, {"s": Target("speedup", min=5)}).met()


def test_every_chapters_benchmarks_are_found_without_a_module_list():
    names = set(bench.load_all())
    assert {
        "baselines",  # 00
        "threads",
        "sim_overhead",  # 01
        "fedavg_vs_fedsgd",
        "vectorized_clients",
        "flower_vs_labsupport",
        "dp_overhead",  # 02
        "accountants",
        "privacy_utility",
        "secagg_cost",
        "noniid_sweep",  # 03
        "robust_attacks",
        "aggregator_speed",
        "edge_table",  # 04
        "hybrid",  # 05
    } <= names


def test_run_writes_json_and_the_report_renders_it(tmp_path, monkeypatch, capsys):
    @bench.benchmark("_toy", "a toy benchmark for the test")
    def _toy(smoke: bool) -> Result:
        return Result({"x": 2.0 if smoke else 1.0}, {"x": Target("x", min=1.5)})

    monkeypatch.setitem(bench.BENCHMARKS, "_toy", bench.BENCHMARKS.pop("_toy"))
    out = tmp_path / "bench"
    payload = bench.run("_toy", smoke=True, out_dir=out)
    saved = json.loads((out / "_toy.json").read_text())
    assert saved["figures"] == {"x": 2.0} and saved["met"] == {"x": True} and saved["smoke"]
    assert "targets met" in bench.summary_line(payload)

    readme = tmp_path / "repo" / "README.md"
    readme.parent.mkdir()
    readme.write_text(f"intro\n{report.BEGIN}\nold table\n{report.END}\nrest\n")
    assert report.main(["--bench-dir", str(out), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old table" not in text and "| _toy (smoke) | x | 2 | x >= 1.5 | yes |" in text
    assert text.startswith("intro\n") and text.endswith("rest\n")
    assert "| _toy (smoke) | x | 2 |" in (out.parent / "README.md").read_text()


def test_unknown_benchmark_is_explained():
    with pytest.raises(ValueError, match="unknown benchmark"):
        bench.run("nope")


def test_list_command(capsys):
    from labsupport.bench.__main__ import main

    assert main(["--list"]) == 0
    assert "baselines" in capsys.readouterr().out


def test_several_benchmarks_run_each_in_its_own_process_and_a_failure_loses_no_other(
    tmp_path, monkeypatch, capsys
):
    from labsupport.bench import __main__ as cli

    calls = []

    def fake_run(cmd, **kwargs):  # one child process per benchmark: fail the first, pass the second
        calls.append(cmd)
        name = cmd[cmd.index("labsupport.bench") + 1]
        if name == "threads":
            return subprocess.CompletedProcess(cmd, 1)
        payload = {"benchmark": name, "figures": {"x": 1.0}, "met": {"x": True}, "seconds": 0.1}
        (tmp_path / f"{name}.json").write_text(json.dumps(payload))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(cli.subprocess, "run", fake_run)
    assert cli.main(["threads", "accountants", "--smoke", "--out", str(tmp_path)]) == 1
    assert [c[c.index("labsupport.bench") + 1] for c in calls] == ["threads", "accountants"]
    assert all(c[0] == sys.executable and "--smoke" in c for c in calls)
    out = capsys.readouterr()
    assert "threads: FAILED" in out.out and "accountants: x=1 -- 1/1 targets met" in out.out
    assert "1 benchmark(s) failed: threads" in out.err
