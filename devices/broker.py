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

    def __init__(self, folder: Path, *, port: int | None = None, anonymous: bool = False):
        self.folder = Path(folder)
        self.port = port or free_port()
        self.anonymous = anonymous
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
            *([] if self.anonymous else [f"password_file {passwords}"]),
            "",
        ]))
        return conf

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
