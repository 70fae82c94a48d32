"""TLS for the API: the server's certificate, its fingerprint, and pinning.

The API speaks only TLS. The server's certificate is the admin's
(``server.tls_cert``/``server.tls_key``) or one it makes on first start in
``<state_dir>/tls/`` (key mode 0600). A client trusts exactly one certificate
per server: the one whose SHA-256 fingerprint it pinned, as ssh does with
``known_hosts``. The pin is checked in the TLS handshake, before the first
Pyro message (which already carries the token) leaves the client:
``connect_pinned`` fetches the certificate once without verification only to
compare its fingerprint, then connects with a context whose only trust anchor
is that certificate.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import os
import re
import socket
import ssl
import threading
from pathlib import Path

from dopq.core.errors import DopqError, ServerIdentityChanged, ServerUnavailable

PREFIX = "SHA256:"
CERT_NAME, KEY_NAME = "server-cert.pem", "server-key.pem"
VALID_DAYS = 3650

_known: dict[str, ssl.SSLContext] = {}  # fingerprint -> a context trusting only that cert
_known_lock = threading.Lock()


# -- fingerprints -------------------------------------------------------------------------
def fingerprint(der: bytes) -> str:
    """``SHA256:<base64>`` of a DER certificate, as ssh writes key fingerprints."""
    digest = hashlib.sha256(der).digest()
    return PREFIX + base64.b64encode(digest).decode("ascii").rstrip("=")


def parse_fingerprint(text: str) -> str:
    """The canonical form of a fingerprint given as ``SHA256:<base64>`` or as hex.

    Hex (``openssl x509 -fingerprint -sha256`` prints ``AB:CD:...``) is
    accepted with or without colons.
    """
    raw = text.strip()
    raw = re.sub(r"^(sha256 fingerprint=|sha256:)", "", raw, flags=re.IGNORECASE)
    hexed = raw.replace(":", "")
    if re.fullmatch(r"[0-9a-fA-F]{64}", hexed):
        digest = bytes.fromhex(hexed)
    else:
        try:
            digest = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
        except ValueError:
            digest = b""
    if len(digest) != 32:
        raise DopqError(f"not a SHA-256 fingerprint: {text.strip()[:80]!r} "
                        "(expected SHA256:<base64>, as `dopq server fingerprint` prints)")
    return PREFIX + base64.b64encode(digest).decode("ascii").rstrip("=")


def certificate_der(path: str | Path) -> bytes:
    """The first certificate of a PEM file, as DER."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise DopqError(f"cannot read certificate {path}: {exc}") from None
    m = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", text, re.S)
    if not m:
        raise DopqError(f"{path}: no PEM certificate in it")
    return ssl.PEM_cert_to_DER_cert(m.group(0))


def file_fingerprint(path: str | Path) -> str:
    return fingerprint(certificate_der(path))


# -- the server's certificate ----------------------------------------------------------------
def ensure_certificate(cert: str, key: str, state_dir: Path, name: str) -> tuple[Path, Path]:
    """The admin's pair when given, else ours under ``state_dir/tls`` (made once)."""
    if cert:
        return Path(cert), Path(key)
    folder = state_dir / "tls"
    cert_path, key_path = folder / CERT_NAME, folder / KEY_NAME
    if cert_path.is_file() and key_path.is_file():
        return cert_path, key_path
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(folder, 0o700)
        make_self_signed(cert_path, key_path, name)
    except OSError as exc:
        raise DopqError(f"cannot make the server's TLS certificate in {folder}: "
                        f"{exc.strerror or exc} (run this as the server's user)") from None
    return cert_path, key_path


def make_self_signed(cert_path: Path, key_path: Path, name: str) -> None:
    """An EC P-256 key (mode 0600) and a self-signed certificate for it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"dopq {name}")])
    now = datetime.datetime.now(datetime.UTC)
    alt = x509.SubjectAlternativeName([
        x509.DNSName("localhost"), x509.DNSName(socket.gethostname() or "localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(alt, critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    _write(key_path, key_pem, 0o600)
    _write(cert_path, certificate.public_bytes(serialization.Encoding.PEM), 0o644)


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def server_context(cert: str | Path, key: str | Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise DopqError(f"cannot use TLS certificate {cert} / key {key}: {exc}") from None
    return ctx


# -- the client's side -----------------------------------------------------------------------
def probe_certificate(host: str, port: int, timeout: float) -> bytes:
    """The server's certificate, fetched without verification; nothing else is sent."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                ctx.wrap_socket(raw) as tls:
            der = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError) as exc:
        raise ServerUnavailable(f"no TLS server at {host}:{port}: {exc}") from None
    if not der:
        raise ServerUnavailable(f"{host}:{port} presented no certificate")
    return der


def pinned_context(der: bytes) -> ssl.SSLContext:
    """A client context whose one trust anchor is this certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False  # the pin names the server, not the address it sits at
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # a CA-signed leaf is trusted alone
    ctx.load_verify_locations(cadata=der)
    return ctx


def identity_changed(server: str, host: str, port: int, got: str, pin: str) -> DopqError:
    return ServerIdentityChanged(
        f"server identity changed: {server} at {host}:{port} presents {got}, pinned {pin}; "
        "nothing was sent. If the admin replaced the certificate, compare with "
        "`dopq server fingerprint` on the server host and sign in with --fingerprint")


def connect_pinned(host: str, port: int, pin: str, timeout: float,
                   server: str = "the server") -> ssl.SSLSocket:
    """A TLS connection to a server that proved it holds the pinned certificate."""
    with _known_lock:
        ctx = _known.get(pin)
    if ctx is None:
        der = probe_certificate(host, port, timeout)
        if fingerprint(der) != pin:
            raise identity_changed(server, host, port, fingerprint(der), pin)
        ctx = pinned_context(der)
        with _known_lock:
            _known[pin] = ctx
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
        # A call is one message, then its reply. With Nagle's algorithm on, every TLS
        # record after a message's first waited for the server's delayed ACK: a
        # 32 KiB call took 44 ms instead of 2 (dopq.wire.transport does the same).
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:
        raise ServerUnavailable(f"cannot connect to {server} at {host}:{port}: {exc}") from None
    try:
        tls = ctx.wrap_socket(raw)
    except ssl.SSLCertVerificationError as exc:
        raw.close()
        got = fingerprint(probe_certificate(host, port, timeout))
        if got != pin:
            raise identity_changed(server, host, port, got, pin) from None
        raise ServerUnavailable(f"{server}: TLS verification failed: "
                                f"{exc.verify_message or exc}") from None
    except (OSError, ssl.SSLError) as exc:
        raw.close()
        raise ServerUnavailable(f"TLS handshake with {server} at {host}:{port} failed: "
                                f"{exc}") from None
    der = tls.getpeercert(binary_form=True) or b""
    if fingerprint(der) != pin:  # the context cannot let this happen; checked all the same
        tls.close()
        raise identity_changed(server, host, port, fingerprint(der), pin)
    return tls
