"""A locked-down nats-server for a swarm: TLS, one nkey user per agent, an operator user, no anonymous access.

``busagents swarm secure swarm.toml -o DIR`` writes (see :func:`write_secure`)::

    DIR/nats-server.conf      JetStream (DIR/jetstream), TLS, the users and their permissions
    DIR/secure.json           what `swarm up --secure DIR` needs: port, CA path, agents (no secret)
    DIR/keys/  (0700)         ca.pem, ca-key.pem, server.pem, server-key.pem (keys 0600)
    DIR/creds/ (0700)         <agent>.nk and busagents-operator.nk: each an nkey seed, 0600

Each agent's user has exactly the permissions of :meth:`Graph.permissions`; the operator (the CLI:
``dlq list/show``, ``ps``, ``watch``) may read every subject and the dead-letter stream, and
publish nothing the agents' contracts use. Public keys are written in the configuration; seeds
and private keys only in their own owner-only files, and never printed.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nkeys
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ..dlq import DLQ_STREAM
from ..errors import ConfigError

__all__ = ["OPERATOR", "SecureSetup", "load_secure", "operator_permissions", "write_secure"]

#: The CLI's user; its seed is ``DIR/creds/busagents-operator.nk``.
OPERATOR = "busagents-operator"
_MANIFEST = "secure.json"


@dataclass(frozen=True)
class SecureSetup:
    """What ``swarm up --secure DIR`` reads back from DIR (paths only, never a secret)."""

    dir: Path
    port: int
    ca: Path
    agents: tuple[str, ...]

    @property
    def config(self) -> Path:
        return self.dir / "nats-server.conf"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def creds_dir(self) -> Path:
        return self.dir / "creds"

    def creds(self, agent: str) -> Path:
        return self.creds_dir / f"{agent}.nk"


def operator_permissions() -> dict[str, Any]:
    """The operator's rights: read everything, the JetStream info and dead-letter reads, the services protocol."""
    return {
        "publish": sorted(
            {
                "$JS.API.INFO",
                "$JS.API.STREAM.NAMES",
                "$JS.API.STREAM.LIST",
                "$JS.API.STREAM.INFO.*",
                "$JS.API.CONSUMER.NAMES.*",
                "$JS.API.CONSUMER.LIST.*",
                "$JS.API.CONSUMER.INFO.*.*",
                f"$JS.API.STREAM.MSG.GET.{DLQ_STREAM}",
                f"$JS.API.DIRECT.GET.{DLQ_STREAM}",
                "$SRV.>",
            }
        ),
        "subscribe": [">"],
    }


def write_secure(
    perms: dict[str, dict[str, Any]],
    out: Path,
    *,
    port: int = 4222,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    tls_ca: Path | None = None,
) -> list[Path]:
    """Write the configuration, keys and seeds of a secured swarm into ``out``; the files written."""
    if OPERATOR in perms:
        raise ConfigError(f"an agent may not be named {OPERATOR!r}: it is the CLI's user of a secured swarm")
    given = [p for p in (tls_cert, tls_key, tls_ca) if p is not None]
    if given and len(given) != 3:
        raise ConfigError("give all of --tls-cert, --tls-key and --tls-ca, or none (a local CA is then generated)")
    for path in given:
        if not path.is_file():
            raise ConfigError(f"no such file: {path}")
    out = out.absolute()
    keys, creds = out / "keys", out / "creds"
    for folder in (out, keys, creds):
        folder.mkdir(parents=True, exist_ok=True)
    keys.chmod(0o700)
    creds.chmod(0o700)
    written: list[Path] = []
    if tls_cert is None or tls_key is None or tls_ca is None:
        tls_cert, tls_key, tls_ca = keys / "server.pem", keys / "server-key.pem", keys / "ca.pem"
        written += _write_tls(keys)
    users, who = [], []
    for name, p in sorted({**perms, OPERATOR: operator_permissions()}.items()):
        public = _write_seed(creds / f"{name}.nk")
        written.append(creds / f"{name}.nk")
        who.append(f"#   {public}  {name}\n")  # the server's log names a user by its public key
        rights: dict[str, Any] = {"publish": {"allow": p["publish"]}, "subscribe": {"allow": p["subscribe"]}}
        if p.get("allow_responses"):
            rights["allow_responses"] = True
        users.append({"nkey": public, "permissions": rights})
    config = out / "nats-server.conf"
    config.write_text(
        "# busagents swarm secure: TLS required, one nkey user per agent, no anonymous access\n"
        f"listen: {json.dumps(f'127.0.0.1:{port}')}\n"
        f"jetstream {{ store_dir: {json.dumps(str(out / 'jetstream'))} }}\n"
        f"tls {{ cert_file: {json.dumps(str(tls_cert.absolute()))}, key_file: {json.dumps(str(tls_key.absolute()))}, "
        f"ca_file: {json.dumps(str(tls_ca.absolute()))}, verify: false, timeout: 5 }}\n"
        "# users (public nkeys; the seeds are in creds/, never here):\n"
        + "".join(who)
        + f"authorization {{ users = {json.dumps(users, indent=2)} }}\n"
    )
    manifest = out / _MANIFEST
    manifest.write_text(
        json.dumps({"port": port, "ca": str(tls_ca.absolute()), "agents": sorted(perms)}, indent=2) + "\n"
    )
    return [config, manifest, *written]


def load_secure(out: Path) -> SecureSetup:
    """The setup ``write_secure`` left in ``out``, or a ConfigError saying how to make one."""
    try:
        data = json.loads((out / _MANIFEST).read_text())
        return SecureSetup(out.absolute(), int(data["port"]), Path(data["ca"]), tuple(data["agents"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"{out} holds no secured swarm setup ({exc.__class__.__name__} reading {_MANIFEST}): "
            "write one with 'busagents swarm secure SWARM.toml -o DIR'"
        ) from None


def _write_seed(path: Path) -> str:
    """A new user nkey: its seed into ``path`` (0600, created so, never readable by others); its public key."""
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    _write_private(path, seed)
    public: bytes = nkeys.from_seed(bytearray(seed)).public_key
    return public.decode()


def _write_private(path: Path, data: bytes) -> None:
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_tls(keys: Path) -> list[Path]:
    """A local CA and a server certificate for 127.0.0.1 and localhost, signed by it (valid one year)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "busagents local CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (keys / "ca.pem").write_bytes(ca.public_bytes(pem))
    (keys / "server.pem").write_bytes(cert.public_bytes(pem))
    for name, private in (("ca-key.pem", ca_key), ("server-key.pem", key)):
        _write_private(
            keys / name,
            private.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        )
    return [keys / "ca.pem", keys / "ca-key.pem", keys / "server.pem", keys / "server-key.pem"]
