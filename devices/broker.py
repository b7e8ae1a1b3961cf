"""A private Mosquitto broker (Debian's `mosquitto` binary) on a free port, with persistence.

Tests, the stream benchmark and the demo start one in a folder of their own so that they can
restart it (its persistence file keeps sessions and queued messages) without touching a shared
broker. Anonymous clients are refused; one user with a generated password is allowed.
"""

from __future__ import annotations

import getpass
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from chronorisk.errors import ChronoriskError

USER = "chronorisk"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto",) if os.path.exists(p)), None)
    if found is None:
        raise ChronoriskError("the mosquitto broker is not installed (Debian package 'mosquitto')")
    return found


class PrivateBroker:
    """`start()`, `stop()` (SIGTERM: the broker saves its persistence file), `kill()`, `restart()`."""

    def __init__(self, folder: Path, *, port: int | None = None, anonymous: bool = False, tls: bool = False):
        self.folder = Path(folder)
        self.port = port or free_port()
        self.anonymous = anonymous
        self.tls = tls  # TLS with client certificates required (the certificate's CN is the user)
        self.password = secrets.token_urlsafe(18)
        self.proc: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        """The consumer's and publishers' settings for this broker (CHRONORISK_MQTT_PASSWORD)."""
        return {"CHRONORISK_MQTT_PASSWORD": self.password}

    def _configure(self) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        os.chmod(self.folder, 0o700)
        passwords = self.folder / "passwords"
        if not passwords.exists():
            passwords.write_text("")
            subprocess.run(["mosquitto_passwd", "-b", str(passwords), USER, self.password], check=True,
                           capture_output=True)
            os.chmod(passwords, 0o600)
        conf = self.folder / "mosquitto.conf"
        conf.write_text("\n".join([
            "persistence true",
            f"persistence_location {self.folder}/",
            "autosave_interval 1",
            "max_queued_messages 0",  # a persistent session keeps every reading while its consumer is away
            "max_inflight_messages 0",
            "log_dest none",
            f"user {getpass.getuser()}",  # started as root, mosquitto would switch to a user who cannot read here
            f"listener {self.port} 127.0.0.1",
            f"allow_anonymous {'true' if self.anonymous else 'false'}",
            *([] if self.anonymous or self.tls else [f"password_file {passwords}"]),
            *(self._tls_lines() if self.tls else []),
            "",
        ]))
        return conf

    def _tls_lines(self) -> list[str]:
        files = server_certificates(self.folder / "certs")
        return [f"cafile {files['ca']}", f"certfile {files['cert']}", f"keyfile {files['key']}",
                "require_certificate true", "use_identity_as_username true"]

    def start(self, timeout: float = 10.0) -> PrivateBroker:
        conf = self._configure()
        self.proc = subprocess.Popen([mosquitto_binary(), "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ChronoriskError(f"mosquitto exited at start (code {self.proc.returncode})")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise ChronoriskError(f"mosquitto did not listen on port {self.port} within {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> PrivateBroker:
        self.stop()
        return self.start()

    def __enter__(self) -> PrivateBroker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def server_certificates(cert_dir: Path) -> dict[str, Path]:
    """A CA and the broker's loopback certificate (the federated deployment's own generator)."""
    from chronorisk.federated.deploy import ensure_certificates

    return ensure_certificates(cert_dir)


def client_certificate(cert_dir: Path, name: str, days: int = 30) -> tuple[Path, Path]:
    """A client certificate (CN `name`) signed by `server_certificates`' CA: (certificate, key) files."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    server_certificates(cert_dir)
    ca = x509.load_pem_x509_certificate((cert_dir / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((cert_dir / "ca.key").read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_path, key_path = cert_dir / f"{name}.crt", cert_dir / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
    return cert_path, key_path
