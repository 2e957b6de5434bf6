"""The export's TLS credentials: QEMU's x509 directory made into an
``ssl.SSLContext``, and the authorization of client certificates by DN.

The directory is laid out as QEMU's ``tls-creds-x509`` (and libvirt's
``/etc/pki/qemu``) wants it::

    DIR/ca-cert.pem      the CA that signs the clients' certificates
    DIR/server-cert.pem  this server's certificate (and any intermediates)
    DIR/server-key.pem   its private key
    DIR/ca-crl.pem       optional: certificates revoked by that CA

A client certificate is asked for and, when given, must chain to
``ca-cert.pem`` (a wrong one fails the handshake). ``verify_peer`` makes one
required; an authz list (``--tls-authz``) then admits only the distinguished
names it lists, written as QEMU's authz objects match them: RFC 4514 order,
most specific first (``CN=backup1,O=Example``), which is what ``openssl x509
-noout -subject -nameopt RFC2253`` prints.

TLS-PSK (QEMU's ``tls-creds-psk``, a ``keys.psk`` file) cannot be served:
Python 3.11's ssl module has no PSK callbacks (they came in 3.13). Such a
directory is refused with that reason rather than served as something else.
"""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from dirtydiff import errors

log = logging.getLogger(__name__)

CA_CERT = "ca-cert.pem"
CA_CRL = "ca-crl.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"
PSK_KEYS = "keys.psk"  # QEMU's tls-creds-psk directory

# RFC 4514's short names for the attributes OpenSSL reports by long name;
# the rest are written as OpenSSL names them (as gnutls and QEMU write them).
_SHORT_NAMES = {
    "commonName": "CN",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "streetAddress": "STREET",
    "domainComponent": "DC",
    "userId": "UID",
}
_ESCAPED = ',+"\\<>;='


class TlsRefused(ConnectionError):
    """A client's TLS handshake failed, or its certificate is not allowed."""


def _file(directory: Path, name: str) -> Path:
    path = directory / name
    if not path.is_file():
        raise errors.NotFound("tls-creds", f"TLS credentials: {path} is missing")
    return path


def _refuse_psk(directory: Path) -> None:
    if (directory / PSK_KEYS).exists() and not (directory / SERVER_CERT).exists():
        raise errors.BadRequest(
            "tls-psk",
            f"TLS credentials: {directory} holds TLS-PSK keys ({PSK_KEYS}); Python 3.11's "
            f"ssl has no TLS-PSK (it came in 3.13): give x509 certificates "
            f"({CA_CERT}, {SERVER_CERT}, {SERVER_KEY})",
        )


def _ssl_reason(e: ssl.SSLError | OSError) -> str:
    if isinstance(e, ssl.SSLError):
        return str(e.reason or e.strerror or e).lower().replace("_", " ")
    return e.strerror or str(e)


def check_certificate(path: Path) -> None:
    """Raise a one-line error naming ``path`` unless it holds PEM
    certificates (a key, a truncated file or DER are refused here, where
    the error can say which file)."""
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        probe.load_verify_locations(cafile=str(path))
    except (ssl.SSLError, OSError) as e:
        raise errors.Corrupt(
            "tls-creds", f"TLS credentials: {path} is not a PEM certificate: {_ssl_reason(e)}"
        ) from None


@dataclass(frozen=True)
class X509Dir:
    """The files of one x509 directory, each checked to exist."""

    directory: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    ca_crl: Path | None

    @classmethod
    def find(cls, directory: Path) -> X509Dir:
        if not directory.is_dir():
            raise errors.NotFound("tls-creds", f"TLS credentials: {directory} is not a directory")
        _refuse_psk(directory)
        crl = directory / CA_CRL
        return cls(
            directory,
            _file(directory, CA_CERT),
            _file(directory, SERVER_CERT),
            _file(directory, SERVER_KEY),
            crl if crl.is_file() else None,
        )

    def check(self) -> None:
        """Each certificate file parses; the key matches the certificate."""
        check_certificate(self.ca_cert)
        check_certificate(self.server_cert)
        probe = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            probe.load_cert_chain(str(self.server_cert), str(self.server_key))
        except (ssl.SSLError, OSError) as e:
            raise errors.Corrupt(
                "tls-creds",
                f"TLS credentials: {self.server_key} is not the private key of "
                f"{self.server_cert}: {_ssl_reason(e)}",
            ) from None


@dataclass(frozen=True)
class Authz:
    """Which client DNs may connect: exact names, or QEMU's authz-list-file
    rules (``{"policy": ..., "rules": [{"match", "policy", "format"}]}``,
    first match wins)."""

    rules: tuple[tuple[str, bool, bool], ...]  # (pattern, allow, glob)
    default_allow: bool = False

    def allows(self, dn: str) -> bool:
        for pattern, allow, glob in self.rules:
            if fnmatchcase(dn, pattern) if glob else dn == pattern:
                return allow
        return self.default_allow

    @classmethod
    def load(cls, path: Path) -> Authz:
        """One DN a line (``#`` comments), or a QEMU authz-list-file (JSON)."""
        try:
            text = path.read_text()
        except OSError as e:
            raise errors.NotFound("tls-authz", f"--tls-authz {path}: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise errors.Corrupt("tls-authz", f"--tls-authz {path}: not text") from None
        if text.lstrip().startswith("{"):
            return cls._from_qemu_json(path, text)
        names = tuple(
            line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
        )
        if not names:
            log.warning("--tls-authz %s lists no DN: every client is refused", path)
        return cls(tuple((name, True, False) for name in names))

    @classmethod
    def _from_qemu_json(cls, path: Path, text: str) -> Authz:
        def bad(why: str) -> errors.Corrupt:
            return errors.Corrupt("tls-authz", f"--tls-authz {path}: {why}")

        try:
            found = json.loads(text)
        except json.JSONDecodeError as e:
            raise bad(f"not JSON: {e.msg} at line {e.lineno}") from None
        if not isinstance(found, dict) or not isinstance(found.get("rules", []), list):
            raise bad('want {"policy": "deny", "rules": [...]}')
        rules = []
        for rule in found.get("rules", []):
            if not isinstance(rule, dict) or not isinstance(rule.get("match"), str):
                raise bad(f"a rule without a match: {rule!r}")
            kind = rule.get("format", "exact")
            if kind not in ("exact", "glob"):
                raise bad(f"format {kind!r} is neither exact nor glob")
            rules.append((rule["match"], _policy(rule.get("policy", "deny"), bad), kind == "glob"))
        return cls(tuple(rules), _policy(found.get("policy", "deny"), bad))


def _policy(value: object, bad: Callable[[str], Exception]) -> bool:
    if value not in ("allow", "deny"):
        raise bad(f"policy {value!r} is neither allow nor deny")
    return value == "allow"


def _escape(value: str) -> str:
    out = "".join("\\" + c if c in _ESCAPED else c for c in value)
    if out.startswith(("#", " ")):
        out = "\\" + out
    if out.endswith(" "):
        out = out[:-1] + "\\ "
    return out


def distinguished_name(subject: Iterable[Iterable[tuple[str, str]]]) -> str:
    """``getpeercert()['subject']`` (in certificate order) as RFC 4514 writes
    it: the last RDN first, multi-valued RDNs joined by ``+``."""
    return ",".join(
        "+".join(f"{_SHORT_NAMES.get(k, k)}={_escape(v)}" for k, v in rdn)
        for rdn in reversed(list(subject))
    )


class TlsCreds:
    """What a TLS listener needs: the server context, and the check of each
    client's certificate once its handshake is done."""

    def __init__(
        self, directory: Path, *, verify_peer: bool = False, authz: Path | None = None
    ) -> None:
        found = X509Dir.find(directory)
        found.check()
        self.directory = directory
        self.authz = Authz.load(authz) if authz is not None else None
        # A DN list means nothing without a certificate to read it from.
        self.verify_peer = verify_peer or self.authz is not None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(found.server_cert), str(found.server_key))
        context.load_verify_locations(cafile=str(found.ca_cert))
        if found.ca_crl is not None:
            try:
                context.load_verify_locations(cafile=str(found.ca_crl))
            except ssl.SSLError as e:
                raise errors.Corrupt(
                    "tls-creds",
                    f"TLS credentials: {found.ca_crl} is not a PEM CRL: {_ssl_reason(e)}",
                ) from None
            context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        # Asked for always (so a bad one fails), required with verify_peer.
        context.verify_mode = ssl.CERT_REQUIRED if self.verify_peer else ssl.CERT_OPTIONAL
        self.context = context

    def admit(self, peer_cert: Mapping[str, object] | None) -> str | None:
        """The client's DN if it may go on (None: no certificate, allowed
        without verify_peer); raise TlsRefused otherwise."""
        subject = peer_cert.get("subject") if peer_cert else None
        if not subject:
            if self.verify_peer:  # the handshake refuses this already; never rely on it alone
                raise TlsRefused("no client certificate")
            return None
        assert isinstance(subject, tuple)
        dn = distinguished_name(subject)
        if self.authz is not None and not self.authz.allows(dn):
            raise TlsRefused(f"client certificate {dn!r} is not in the authz list")
        return dn
