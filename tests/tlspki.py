"""Certificates for the TLS tests and the TLS benchmark, made with openssl.

``make_pki(DIR)`` makes, in QEMU's and libnbd's directory layouts:

- ``server/``: ca-cert.pem, server-cert.pem (for 127.0.0.1, ::1 and
  localhost), server-key.pem: what ``serve --tls-creds`` and ``qemu-nbd
  --object tls-creds-x509,endpoint=server`` read;
- ``client/`` (CN=backup1,O=Dirtydiff Test) and ``intruder/``
  (CN=intruder,O=Dirtydiff Test): ca-cert.pem, client-cert.pem,
  client-key.pem, what libnbd's ``tls-certificates=DIR`` and QEMU's
  ``endpoint=client`` read, both signed by the same CA;
- ``nocert/``: the CA alone (a client with no certificate of its own);
- ``otherca/``: a client of an unrelated CA, which trusts only that CA (so
  it refuses the server) and whose certificate the server refuses;
- ``crl``: a ``ca-crl.pem`` of the CA that revokes ``intruder``'s certificate.

EC P-256 keys: made in milliseconds, and both OpenSSL and gnutls speak them.
Key usages as QEMU's docs give them to certtool, so that QEMU's own checks of
the certificates it loads pass.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

ORG = "Dirtydiff Test"
CLIENT_DN = f"CN=backup1,O={ORG}"
INTRUDER_DN = f"CN=intruder,O={ORG}"

_SERVER_EXT = (
    "basicConstraints=critical,CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
    "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,IP:::1,DNS:localhost\n"
)
_CLIENT_EXT = (
    "basicConstraints=critical,CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
    "extendedKeyUsage=clientAuth\n"
)


@dataclass(frozen=True)
class Pki:
    root: Path
    server: Path  # --tls-creds DIR
    client: Path  # tls-certificates=DIR, CLIENT_DN
    intruder: Path  # INTRUDER_DN, the same CA
    nocert: Path  # the CA, no client certificate
    otherca: Path  # another CA's client, trusting only it
    crl: Path  # the CA's CRL, intruder revoked


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True,
                   timeout=60)  # fmt: skip


def _key(path: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-out", path, cwd=path.parent)  # fmt: skip


def _ca(work: Path, name: str) -> tuple[Path, Path]:
    key, cert = work / f"{name}-key.pem", work / f"{name}-cert.pem"
    _key(key)
    _openssl("req", "-x509", "-new", "-key", key, "-out", cert, "-days", "3650",
             "-subj", f"/O={ORG}/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=work)  # fmt: skip
    return key, cert


def _signed(
    work: Path, name: str, subject: str, ext: str, ca: tuple[Path, Path]
) -> tuple[Path, Path]:
    key, csr, cert = work / f"{name}-key.pem", work / f"{name}.csr", work / f"{name}-cert.pem"
    (work / f"{name}.ext").write_text(ext)
    _key(key)
    _openssl("req", "-new", "-key", key, "-out", csr, "-subj", subject, cwd=work)
    _openssl("x509", "-req", "-in", csr, "-CA", ca[1], "-CAkey", ca[0], "-CAcreateserial",
             "-out", cert, "-days", "365", "-extfile", work / f"{name}.ext", cwd=work)  # fmt: skip
    return key, cert


def _crl(work: Path, revoked: Path) -> Path:
    """A CRL of ``work``'s CA revoking ``revoked``, by ``openssl ca``."""
    (work / "index.txt").write_text("")
    (work / "crlnumber").write_text("1000\n")
    (work / "ca.cnf").write_text(
        "[ca]\ndefault_ca = test\n[test]\ndatabase = index.txt\ncrlnumber = crlnumber\n"
        "certificate = ca-cert.pem\nprivate_key = ca-key.pem\ndefault_md = sha256\n"
        "default_crl_days = 30\n"
    )
    _openssl("ca", "-config", "ca.cnf", "-revoke", revoked, cwd=work)
    _openssl("ca", "-config", "ca.cnf", "-gencrl", "-out", "ca-crl.pem", cwd=work)
    return work / "ca-crl.pem"


def _lay(directory: Path, ca_cert: Path, role: str | None, pair: tuple[Path, Path] | None) -> Path:
    directory.mkdir(mode=0o700)
    shutil.copy(ca_cert, directory / "ca-cert.pem")
    if role is not None and pair is not None:
        shutil.copy(pair[1], directory / f"{role}-cert.pem")
        shutil.copy(pair[0], directory / f"{role}-key.pem")
    return directory


def make_pki(root: Path) -> Pki:
    """Make every directory of ``Pki`` under ``root`` (created)."""
    work = root / "work"
    work.mkdir(parents=True)
    ca = _ca(work, "ca")
    other = _ca(work, "otherca")
    server = _signed(work, "server", f"/O={ORG}/CN=localhost", _SERVER_EXT, ca)
    client = _signed(work, "client", f"/O={ORG}/CN=backup1", _CLIENT_EXT, ca)
    intruder = _signed(work, "intruder", f"/O={ORG}/CN=intruder", _CLIENT_EXT, ca)
    stranger = _signed(work, "stranger", f"/O={ORG}/CN=backup1", _CLIENT_EXT, other)
    return Pki(
        root,
        server=_lay(root / "server", ca[1], "server", server),
        client=_lay(root / "client", ca[1], "client", client),
        intruder=_lay(root / "intruder", ca[1], "client", intruder),
        nocert=_lay(root / "nocert", ca[1], None, None),
        otherca=_lay(root / "otherca", other[1], "client", stranger),
        crl=_crl(work, intruder[1]),
    )
