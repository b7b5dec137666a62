"""`make lab`'s configuration (labsupport.labserver, jupyter/): checked without starting a browser."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from labsupport.labserver import (
    APP_SETTINGS_DIR,
    CONFIG_DIR,
    LabServer,
    free_port,
    lab_command,
    lab_environment,
)

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = Path(sys.prefix) / "share" / "jupyter" / "lab" / "schemas"


def test_environment_drops_test_only_variables_and_puts_repository_config_first():
    base = {
        "MPLBACKEND": "Agg",
        "TQDM_DISABLE": "1",
        "JUPYTER_CONFIG_PATH": "/elsewhere",
        "KEEP": "me",
    }
    env = lab_environment(base)
    assert "MPLBACKEND" not in env and "TQDM_DISABLE" not in env
    assert env["JUPYTER_CONFIG_PATH"].split(os.pathsep) == [str(CONFIG_DIR), "/elsewhere"]
    assert env["JUPYTER_PREFER_ENV_PATH"] == "1"
    assert env["KEEP"] == "me"
    assert "LAB_SMOKE" not in env
    assert base["MPLBACKEND"] == "Agg"  # the caller's mapping is not changed


def test_isolated_environment_keeps_every_user_directory_under_one_folder(tmp_path):
    env = lab_environment({}, isolated_dir=tmp_path, smoke=True)
    names = [
        "JUPYTER_CONFIG_DIR",
        "JUPYTER_DATA_DIR",
        "JUPYTER_RUNTIME_DIR",
        "JUPYTERLAB_SETTINGS_DIR",
        "JUPYTERLAB_WORKSPACES_DIR",
    ]
    for name in names:
        path = Path(env[name])
        assert path.parent == tmp_path and path.is_dir(), name
    assert len({env[n] for n in names}) == len(names)
    assert env["LAB_SMOKE"] == "1"


def test_command_serves_the_folder_with_the_repository_settings(tmp_path):
    cmd = lab_command(tmp_path, python="/py", port=1234, token="t", open_browser=False)
    assert cmd[:3] == ["/py", "-m", "jupyterlab"]
    assert f"--ServerApp.root_dir={tmp_path.resolve()}" in cmd
    assert f"--LabApp.app_settings_dir={APP_SETTINGS_DIR}" in cmd
    assert {"--port=1234", "--port-retries=0", "--IdentityProvider.token=t", "--no-browser"} <= set(
        cmd
    )
    assert "--no-browser" not in lab_command(tmp_path)  # `make lab` opens the student's browser


def test_server_config_turns_off_news_update_check_and_pypi_listing():
    config = json.loads((CONFIG_DIR / "jupyter_server_config.json").read_text())
    lab = config["LabApp"]
    assert lab["news_url"] is None
    assert lab["check_for_updates_class"] == "jupyterlab.NeverCheckForUpdate"
    assert lab["extension_manager"] == "readonly"
    assert config["ServerApp"]["ip"] == "127.0.0.1"
    page = json.loads((CONFIG_DIR / "labconfig" / "page_config.json").read_text())
    assert page == {"buildCheck": False, "buildAvailable": False}


def test_settings_overrides_name_real_plugins_and_valid_values():
    """Keys are plugin ids ("pkg:plugin"), checked against JupyterLab's installed schemas."""
    if not SCHEMAS.is_dir():
        pytest.skip(f"JupyterLab's schemas are not at {SCHEMAS}")
    overrides = json.loads((APP_SETTINGS_DIR / "overrides.json").read_text())
    assert overrides["@jupyterlab/apputils-extension:notification"]["fetchNews"] == "false"
    for plugin, values in overrides.items():
        package, _, name = plugin.partition(":")
        schema = json.loads((SCHEMAS / package / f"{name}.json").read_text())
        for key, value in values.items():
            prop = schema["properties"][key]
            if "enum" in prop:
                assert value in prop["enum"], (plugin, key, value)
            else:
                assert type(value).__name__ == {"boolean": "bool", "string": "str"}[prop["type"]]


def test_notebooks_ask_for_the_kernel_the_project_environment_provides():
    from jupyter_client.kernelspec import KernelSpecManager

    names = {
        json.loads(nb.read_text())["metadata"]["kernelspec"]["name"]
        for nb in (ROOT / "notebooks").glob("*.ipynb")
    }
    assert names == {"python3"}
    spec = KernelSpecManager().get_kernel_spec("python3")
    # "python" is replaced by the server's own interpreter (jupyter_client), the project's Python
    assert spec.argv[0] in {"python", sys.executable}


def test_free_port_is_bindable_on_loopback():
    import socket

    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_server_rejects_a_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="is not a directory"):
        LabServer(tmp_path / "missing")
