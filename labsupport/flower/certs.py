"""Throwaway credentials for a secure Flower federation: a CA, a SuperLink certificate, node keys.

Flower 1.42 secures a federation in two layers (chapter 01's deployment section, issue 14):

* **TLS** between every SuperNode (and ``flwr``) and the SuperLink: the SuperLink presents a
  certificate signed by a CA that the nodes trust (``--root-certificates ca.pem``). The
  certificate's subjectAltName must name every address the nodes dial -- here ``127.0.0.1`` and
  ``localhost`` -- or the TLS handshake fails.
* **SuperNode authentication** (``--enable-supernode-auth``): each SuperNode holds an ECDSA key pair
  on a NIST curve, in OpenSSH format; its public key is registered with ``flwr supernode register``,
  and the node signs its requests with the private key (``--auth-supernode-private-key``). The
  SuperLink refuses nodes whose key is not registered.

Everything is made with the ``cryptography`` package (no ``openssl`` or ``ssh-keygen`` binaries).
Private keys are written with mode 0600 (created that way, never readable by others even briefly)
and never logged or returned as text by this module. These are test credentials for loopback and
classroom networks: a real deployment keeps its CA key offline and rotates node keys.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "DEFAULT_HOSTS",
    "Credentials",
    "make_ca",
    "make_credentials",
    "make_server_certificate",
    "make_supernode_key",
    "write_private_key",
    "write_supernode_key",
]

#: The addresses a loopback federation dials: SuperNodes, ``flwr`` and the SuperLink's own
#: ``flower-superexec`` (which connects to 127.0.0.1).
DEFAULT_HOSTS = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class Credentials:
    """Paths of a federation's credentials (one key pair per SuperNode)."""

    ca_certificate: Path
    server_certificate: Path
    server_key: Path
    node_private_keys: tuple[Path, ...]
    node_public_keys: tuple[Path, ...]
    hosts: tuple[str, ...]


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(
    common_name: str = "labsupport throwaway CA", days: int = 2
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA certificate (P-256) valid for ``days`` days, and its private key."""
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        if not isinstance(host, str) or not host.strip():
            raise ValueError(f"host {host!r} must be a non-empty IP address or DNS name")
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_server_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    days: int = 2,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The SuperLink's TLS certificate, signed by the CA, whose SANs are ``hosts`` (IPs and names)."""
    if not hosts:
        raise ValueError("hosts is empty; the certificate must name the addresses nodes dial")
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("superlink"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def make_supernode_key() -> ec.EllipticCurvePrivateKey:
    """A SuperNode's authentication key: ECDSA on NIST P-384 (what ``ssh-keygen -t ecdsa -b 384``
    makes, and what ``flwr supernode register`` accepts)."""
    return ec.generate_private_key(ec.SECP384R1())


def write_private_key(path: str | os.PathLike, data: bytes) -> Path:
    """Write private key bytes to ``path``, created with mode 0600 (replacing any old file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)  # in case the umask was stricter than needed, or looser than asked
    return path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_supernode_key(path: str | os.PathLike) -> tuple[Path, Path]:
    """A new SuperNode key pair: ``path`` (OpenSSH private key, 0600) and ``path.pub``."""
    key = make_supernode_key()
    private = write_private_key(
        path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    public = private.with_name(private.name + ".pub")
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + f" {private.name}\n".encode()
    )
    return private, public


def make_credentials(
    directory: str | os.PathLike,
    num_supernodes: int,
    *,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    days: int = 2,
) -> Credentials:
    """Write a throwaway CA, a SuperLink certificate for ``hosts`` and one key pair per SuperNode.

    Files in ``directory``: ``ca.pem`` (the only file a SuperNode needs besides its own key),
    ``server.pem``, ``server.key`` (0600), ``supernode-<i>`` (OpenSSH private key, 0600) and
    ``supernode-<i>.pub`` (OpenSSH public key, for ``flwr supernode register``). The CA's private
    key is never written: nothing can sign another certificate later.
    """
    if not isinstance(num_supernodes, int) or num_supernodes < 0:
        raise ValueError(f"num_supernodes must be a non-negative integer, got {num_supernodes!r}")
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = make_ca(days=days)
    server_key, server_cert = make_server_certificate(ca_key, ca_cert, hosts, days=days)
    ca_path = folder / "ca.pem"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_path = folder / "server.pem"
    cert_path.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    key_path = write_private_key(folder / "server.key", _pem_key(server_key))
    private, public = [], []
    for i in range(num_supernodes):
        key_path_i, pub_path_i = write_supernode_key(folder / f"supernode-{i}")
        private.append(key_path_i)
        public.append(pub_path_i)
    return Credentials(ca_path, cert_path, key_path, tuple(private), tuple(public), tuple(hosts))


def main(argv: list[str] | None = None) -> int:
    """``python -m labsupport.flower.certs``: write test credentials for a secure federation."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m labsupport.flower.certs", description=main.__doc__
    )
    parser.add_argument("--out", default="certs", help="output folder (default: certs)")
    parser.add_argument("--supernodes", type=int, default=2, help="key pairs to make")
    parser.add_argument(
        "--host",
        action="append",
        default=[],
        help="an extra address the SuperNodes dial (repeatable), e.g. --host 192.168.1.10",
    )
    parser.add_argument("--days", type=int, default=30, help="validity of the certificates")
    parser.add_argument(
        "--node-key",
        default=None,
        help="only write one SuperNode key pair, PATH (0600) and PATH.pub (run it on the device)",
    )
    args = parser.parse_args(argv)
    if args.node_key:
        private, public = write_supernode_key(args.node_key)
        print(f"SuperNode key pair: {private} (0600, stays here), {public} (register it)")
        return 0
    creds = make_credentials(
        args.out, args.supernodes, hosts=[*DEFAULT_HOSTS, *args.host], days=args.days
    )
    lines = [
        f"CA certificate (copy to every device): {creds.ca_certificate}",
        f"SuperLink certificate for {', '.join(creds.hosts)}: {creds.server_certificate}",
        f"SuperLink private key (0600, stays on the server): {creds.server_key}",
    ]
    for private, public in zip(creds.node_private_keys, creds.node_public_keys, strict=True):
        lines.append(f"SuperNode key pair: {private} (0600, to its device only), {public}")
    print("\n".join(lines))  # paths only, never key material
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
