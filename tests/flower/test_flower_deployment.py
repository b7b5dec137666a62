"""Flower's Deployment Engine on loopback: a real SuperLink, real SuperNodes, ``flwr run``.

Slow (a minute or two: every message starts a fresh ``flwr-clientapp`` process that imports torch),
so marked ``slow``; it still runs in CI. Besides the run itself, what matters is that nothing is left
running afterwards -- neither the processes :class:`LocalDeployment` started nor the
``flower-superexec`` / ``flwr-serverapp`` / ``flwr-clientapp`` processes Flower started from them.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from flower_testlib import assert_all_stopped, ours

from labsupport.flower.deployment import DeploymentError, LocalDeployment

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inspects /proc"),
]


def test_two_supernodes_train_two_rounds_then_everything_stops(tmp_path):
    start = time.perf_counter()
    lines: list[str] = []
    deployment = LocalDeployment(
        num_supernodes=2, run_dir=tmp_path / "run", flwr_home=tmp_path / "flwr-home"
    )
    with deployment:
        ready = time.perf_counter() - start
        results = deployment.run({"num-server-rounds": 2}, on_line=lines.append, timeout=300)
        seen = ours(deployment)
        config_toml = (tmp_path / "flwr-home" / "config.toml").read_text()
    total = time.perf_counter() - start

    assert results["status"] == "completed"
    rounds = [r["round"] for r in results["rows"]]
    accuracy = [r["accuracy"] for r in results["rows"]]
    assert results["history"].evaluated()[0] == [1, 2]
    assert results["history"].column("clients") == [[0, 1], [0, 1]]
    assert rounds == [0, 1, 2]
    assert accuracy[2] > accuracy[0] + 0.05, accuracy
    assert results["config"]["num-partitions"] == 2
    assert Path(results["model_file"]).exists()
    assert any("[ROUND 2/2]" in line for line in lines)
    assert deployment.address in config_toml and deployment.connection in config_toml

    commands = " | ".join(seen.values())
    assert commands.count("flower-superexec") >= 3, commands  # the SuperLink's + one per SuperNode
    assert commands.count("flower-supernode") == 2
    assert_all_stopped(deployment, seen)
    assert deployment.connection not in (tmp_path / "flwr-home" / "config.toml").read_text()
    print(f"ready after {ready:.1f} s, run + stop done after {total:.1f} s")


def test_failed_runs_raise_with_their_reason_and_close_still_stops_everything(tmp_path):
    deployment = LocalDeployment(
        num_supernodes=1, run_dir=tmp_path / "run", flwr_home=tmp_path / "flwr-home"
    )
    seen: dict[int, str] = {}
    with pytest.raises(DeploymentError, match="lr must be > 0"):
        with deployment:
            # refused by the SuperLink: the key is not in [tool.flwr.app.config]
            with pytest.raises(DeploymentError, match="Invalid run configuration"):
                deployment.run({"no-such-knob": 1}, stream=False, timeout=120)
            seen = ours(deployment)
            # accepted, then the ServerApp raises; the error reaches the caller
            deployment.run({"lr": -1.0}, stream=False, timeout=120)
    assert len(seen) >= 3
    assert_all_stopped(deployment, seen)


def test_a_deployment_refuses_a_folder_without_a_flower_app(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"pyproject\.toml"):
        LocalDeployment(tmp_path)


def test_a_process_that_dies_at_start_is_reported_with_its_log(tmp_path, monkeypatch):
    deployment = LocalDeployment(num_supernodes=1, run_dir=tmp_path / "run", flwr_home=tmp_path)
    crash = [sys.executable, "-c", "import sys; print('cannot bind the port'); sys.exit(3)"]
    monkeypatch.setattr(deployment, "commands", lambda: {"superlink": crash})
    with pytest.raises(DeploymentError, match=r"(?s)superlink exited with code 3.*cannot bind"):
        deployment.start()
    assert deployment.alive() == []
