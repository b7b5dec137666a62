"""Issue 14: a federation with TLS and SuperNode authentication, and the impostors it refuses.

Everything runs on 127.0.0.1. One secure SuperLink with two registered SuperNodes (a module-scoped
fixture) runs one round of the app; then three impostors try to join it, each refused with a clear
reason within a bounded time: a valid but unregistered key, a node that trusts another CA, a node
without TLS. The credentials are checked with the ``cryptography`` package itself, and at the end
nothing the deployment started is left running.
"""

from __future__ import annotations

import stat
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flower_testlib import assert_all_stopped, ours

from labsupport.flower.certs import make_credentials, make_supernode_key, write_private_key
from labsupport.flower.deployment import DeploymentError, LocalDeployment, diagnose_supernode

IMPOSTOR_TIMEOUT = 45.0  # a refusal must be reported within this many seconds, never hang


# --------------------------------------------------------------------------------- credentials


def test_credentials_chain_to_the_ca_and_cover_the_loopback_names(tmp_path):
    creds = make_credentials(tmp_path, 2)
    ca = x509.load_pem_x509_certificate(creds.ca_certificate.read_bytes())
    server = x509.load_pem_x509_certificate(creds.server_certificate.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the signature or issuer does not match
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    other = make_credentials(tmp_path / "other", 0)
    other_ca = x509.load_pem_x509_certificate(other.ca_certificate.read_bytes())
    with pytest.raises(InvalidSignature):  # same CA name, another key
        server.verify_directly_issued_by(other_ca)
    assert not (tmp_path / "ca.key").exists()  # the CA key is never written


def test_private_keys_are_0600_and_node_keys_are_nist_ecdsa_in_openssh_format(tmp_path):
    creds = make_credentials(tmp_path, 2)
    for path in (creds.server_key, *creds.node_private_keys):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for path in (creds.ca_certificate, creds.server_certificate, *creds.node_public_keys):
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 != 0o077  # public files are not secret
    for private, public in zip(creds.node_private_keys, creds.node_public_keys, strict=True):
        key = serialization.load_ssh_private_key(private.read_bytes(), None)
        pub = serialization.load_ssh_public_key(public.read_bytes())
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
        assert pub.public_numbers() == key.public_key().public_numbers()
    assert len({p.read_bytes() for p in creds.node_public_keys}) == 2  # one pair per node


def test_write_private_key_replaces_a_world_readable_file_with_a_0600_one(tmp_path):
    path = tmp_path / "k"
    path.write_text("old")
    path.chmod(0o644)
    write_private_key(path, b"secret")
    assert path.read_bytes() == b"secret" and stat.S_IMODE(path.stat().st_mode) == 0o600


def test_server_certificate_names_an_extra_address_and_rejects_an_empty_host(tmp_path):
    creds = make_credentials(tmp_path, 0, hosts=["127.0.0.1", "localhost", "192.168.1.10"])
    server = x509.load_pem_x509_certificate(creds.server_certificate.read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "192.168.1.10" in [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    with pytest.raises(ValueError, match="host ''"):
        make_credentials(tmp_path / "bad", 0, hosts=["127.0.0.1", ""])


# ------------------------------------------------------------------ binding and diagnosis (no I/O)


def test_an_insecure_superlink_binds_to_loopback_only_unless_told_what_it_exposes(tmp_path):
    assert LocalDeployment(run_dir=tmp_path).exposure == ""
    with pytest.raises(ValueError, match=r"refusing to bind an insecure SuperLink to '0\.0\.0\.0'"):
        LocalDeployment(host="0.0.0.0", run_dir=tmp_path)
    remote = LocalDeployment(host="0.0.0.0", allow_insecure_remote=True, run_dir=tmp_path)
    assert "INSECURE" in remote.exposure and "Anyone who can reach this port" in remote.exposure
    assert remote.address.startswith("127.0.0.1:")  # local nodes still dial loopback
    assert "--insecure" in remote.superlink_command()
    secure = LocalDeployment(host="0.0.0.0", secure=True, run_dir=tmp_path)
    assert "only SuperNodes whose public keys were registered" in secure.exposure


def test_secure_commands_carry_exactly_the_tls_and_auth_flags(tmp_path):
    deployment = LocalDeployment(num_supernodes=2, secure=True, run_dir=tmp_path)
    cmds = deployment.commands()
    creds = deployment.credentials
    link = cmds["superlink"]
    assert "--insecure" not in link and "--enable-supernode-auth" in link
    for flag, path in (
        ("--ssl-ca-certfile", creds.ca_certificate),
        ("--ssl-certfile", creds.server_certificate),
        ("--ssl-keyfile", creds.server_key),
    ):
        assert link[link.index(flag) + 1] == str(path)
    for i in range(2):
        node = cmds[f"supernode-{i}"]
        assert "--insecure" not in node
        assert node[node.index("--root-certificates") + 1] == str(creds.ca_certificate)
        key = node[node.index("--auth-supernode-private-key") + 1]
        assert key == str(creds.node_private_keys[i])


@pytest.mark.parametrize(
    ("log", "reason"),
    [
        ("ERROR: Exit Code: 305\n[code: 2004] Failed to activate SuperNode.", "not registered"),
        ("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed", "does not trust"),
        ("Server disconnected without sending a response.", "requires TLS"),
        ("Exit Code: 303\nInsecure connection is enabled, but the ...", "no TLS"),
        ("INFO: Starting Flower SuperNode", "did not report a SuperNode ID"),
    ],
)
def test_diagnose_supernode_names_the_reason(log, reason):
    assert reason in diagnose_supernode(log)


#: An --insecure node's log as CI once read it against a TLS SuperLink: it exited (code 1) after
#: one retry warning, before any connection error was written out.
CUT_SHORT = (
    "WARNING :   Option `--insecure` was set. Starting insecure channel to 127.0.0.1:43681.\n"
    "INFO :      Starting Flower SuperExec\n"
    "WARNING :   Connection attempt failed, retrying in 0.72 seconds"
)


def test_diagnose_supernode_reads_a_reset_or_a_cut_short_log_of_a_plain_http_node():
    reset = "Failed to initialize the connection to the SuperLink.\n[Errno 104] Connection reset by peer"
    assert "requires TLS" in diagnose_supernode(reset)  # the other way a TLS server refuses it
    assert "requires TLS" in diagnose_supernode(CUT_SHORT, superlink_tls=True)
    # Without knowing the SuperLink speaks TLS, a failed attempt alone proves nothing.
    assert "did not report a SuperNode ID" in diagnose_supernode(CUT_SHORT)
    assert "did not report a SuperNode ID" in diagnose_supernode(CUT_SHORT, superlink_tls=False)


# ------------------------------------------------------------------- the secure federation, live


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inspects /proc")


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """One secure SuperLink with two registered SuperNodes, shared by the live tests."""
    root = tmp_path_factory.mktemp("secure")
    deployment = LocalDeployment(
        num_supernodes=2, secure=True, run_dir=root / "run", flwr_home=root / "flwr-home"
    )
    seen: dict[int, str] = {}
    with deployment:
        seen.update(ours(deployment))
        yield deployment, seen
        seen.update(ours(deployment))
    assert_all_stopped(deployment, seen)
    logs = "".join(p.read_text(errors="replace") for p in (root / "run").glob("*.log"))
    assert "PRIVATE KEY" not in logs  # no key material in any log


def _online(deployment: LocalDeployment) -> list[str]:
    return sorted(n["node-id"] for n in deployment.supernodes() if n["status"] == "online")


@pytest.mark.slow
@linux_only
def test_secure_federation_runs_one_round_with_two_registered_supernodes(federation):
    deployment, seen = federation
    assert len(_online(deployment)) == 2
    config = (deployment.flwr_home / "config.toml").read_text()
    assert "root-certificates" in config and deployment.connection in config
    results = deployment.run({"num-server-rounds": 1}, stream=False, timeout=300)
    assert results["status"] == "completed"
    assert results["history"].column("clients") == [[0, 1]]
    assert results["rows"][1]["accuracy"] > results["rows"][0]["accuracy"]
    seen.update(ours(deployment))


def _impostor(deployment: LocalDeployment, **credentials) -> tuple[DeploymentError, float]:
    start = time.monotonic()
    with pytest.raises(DeploymentError) as info:
        deployment.start_supernode(
            f"impostor-{len(deployment.processes)}", timeout=IMPOSTOR_TIMEOUT, **credentials
        )
    elapsed = time.monotonic() - start
    name = next(n for n in reversed(deployment.processes) if n.startswith("impostor"))
    assert deployment.processes[name].poll() is not None  # stopped, with its process group
    return info.value, elapsed


@pytest.mark.slow
@linux_only
def test_a_valid_but_unregistered_key_is_refused(federation, tmp_path):
    deployment, _ = federation
    key = make_supernode_key().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    error, elapsed = _impostor(
        deployment,
        private_key=write_private_key(tmp_path / "stranger", key),
        root_certificates=deployment.credentials.ca_certificate,
    )
    assert "public key: the key is not registered" in str(error)
    assert elapsed < IMPOSTOR_TIMEOUT
    assert len(_online(deployment)) == 2  # the federation does not count it


@pytest.mark.slow
@linux_only
def test_a_supernode_that_trusts_another_ca_cannot_connect(federation, tmp_path):
    deployment, _ = federation
    other = make_credentials(tmp_path / "other", 1)
    error, elapsed = _impostor(
        deployment,
        private_key=deployment.credentials.node_private_keys[0],  # even with a registered key
        root_certificates=other.ca_certificate,
    )
    assert "does not trust the SuperLink's certificate" in str(error)
    assert elapsed < IMPOSTOR_TIMEOUT


@pytest.mark.slow
@linux_only
def test_a_supernode_without_tls_cannot_talk_to_the_tls_superlink(federation):
    deployment, _ = federation
    error, elapsed = _impostor(deployment, insecure=True)
    assert "speaks plain HTTP (--insecure) but the SuperLink requires TLS" in str(error)
    assert elapsed < IMPOSTOR_TIMEOUT


def test_registering_a_key_needs_a_secure_deployment(tmp_path):
    with pytest.raises(RuntimeError, match="secure=True"):
        LocalDeployment(run_dir=tmp_path).register_supernode(Path("k.pub"), name="x")


def test_certs_command_line_writes_the_files_and_prints_no_key_material(tmp_path, capsys):
    from labsupport.flower.certs import main

    assert main(["--out", str(tmp_path / "c"), "--supernodes", "1", "--host", "10.0.0.5"]) == 0
    assert main(["--node-key", str(tmp_path / "dev" / "supernode-9")]) == 0
    printed = capsys.readouterr().out
    assert "PRIVATE KEY" not in printed and "10.0.0.5" in printed
    names = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert names == ["ca.pem", "server.key", "server.pem", "supernode-0", "supernode-0.pub"]
    key = tmp_path / "dev" / "supernode-9"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert serialization.load_ssh_public_key((tmp_path / "dev" / "supernode-9.pub").read_bytes())
