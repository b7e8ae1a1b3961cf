"""Flower's deployment engine on this machine: SuperLink and one SuperNode per site, TLS, node auth.

`up` does, in order:

1. certificates: a CA and a server certificate for 127.0.0.1/localhost,
   made with `cryptography` into `<work>/federated/certs` (kept across runs);
2. node identities: one EC P-384 key pair per site in
   `<work>/federated/keys/<site>` (OpenSSH format, private key mode 0600).
   The key *is* the site's identity: the SuperLink maps a public key to one
   node ID, so a restarted SuperNode comes back as the same node;
3. a SuperLink (`flower-superlink`) on loopback with TLS and
   `--enable-supernode-auth`, its state in a SQLite file so registrations
   survive a restart;
4. the Flower CLI connection `chronorisk` in `$FLWR_HOME/config.toml`
   (FLWR_HOME is `<work>/flwr`), then `flwr supernode register` of every
   site's public key: only registered keys are let in, a SuperNode with any
   other key is refused;
5. a detached supervisor process that starts one `flower-supernode` per site
   (`--node-config 'site=... meds=... cache=...'`) and restarts any that dies,
   with back-off, until the SuperLink accepts it again. Pids and status go to
   `<work>/federated/state.json`.

`down` stops the supervisor, which stops everything it started. `run`
(pipeline.py) submits the chronorisk Flower App with `flwr run`.

Timing settings (documented Flower options only): SuperNodes run with
`FLWR_SUPEREXEC_TASK_POLL_INTERVAL` (default here 0.2 s instead of 1 s) so a
pulled message starts its ClientApp at once; the SuperLink runs with
`--disable-runtime-dependency-installation` and SuperNodes without
`--allow-runtime-dependency-installation`, so no ClientApp or ServerApp ever
runs `uv sync`; `FLWR_DISABLE_UPDATE_CHECK=1` keeps every Flower process off
the network. Every Flower process may cache compiled bytecode (next to the
installed packages, or under `<work>/federated/pycache`: `bytecode_env`),
warmed by `up`, because each message starts a new ClientApp process.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from chronorisk.data.files import write_text_atomic
from chronorisk.errors import ChronoriskError

log = logging.getLogger("chronorisk.federated.deploy")

CONNECTION = "chronorisk"
STATE_FILE = "state.json"
FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


class DeploymentError(ChronoriskError):
    """The local federation could not be started, reached or stopped."""


# ---- layout ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where the deployment keeps its files under the work folder."""

    work: Path

    @property
    def root(self) -> Path:
        return self.work / "federated"

    @property
    def certs(self) -> Path:
        return self.root / "certs"

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def state(self) -> Path:
        return self.root / STATE_FILE

    @property
    def superlink_db(self) -> Path:
        return self.root / "superlink.db"

    @property
    def flwr_home(self) -> Path:
        return self.work / "flwr"

    def node_dir(self, site: str) -> Path:
        return self.root / "nodes" / site

    def key(self, site: str) -> Path:
        return self.keys / site


# ---- certificates and keys -------------------------------------------------------------


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _cert_valid(path: Path, margin_days: int = 2) -> bool:
    from cryptography import x509

    if not path.is_file():
        return False
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError:
        return False
    return cert.not_valid_after_utc > dt.datetime.now(dt.UTC) + dt.timedelta(days=margin_days)


def ensure_certificates(cert_dir: Path, days: int = 365) -> dict[str, Path]:
    """CA + server certificate for loopback (127.0.0.1, ::1, localhost); reused while valid."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    files = {"ca": cert_dir / "ca.crt", "cert": cert_dir / "server.pem", "key": cert_dir / "server.key"}
    if all(p.is_file() for p in files.values()) and _cert_valid(files["ca"]) and _cert_valid(files["cert"]):
        return files
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "chronorisk federation CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(
            x509.SubjectAlternativeName([
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.IPAddress(ipaddress.ip_address("::1")),
            ]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    cert_dir.mkdir(parents=True, exist_ok=True)
    _write_private(
        cert_dir / "ca.key",
        ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    _write_private(
        files["key"], key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    write_text_atomic(files["ca"], ca.public_bytes(pem).decode())
    write_text_atomic(files["cert"], cert.public_bytes(pem).decode())
    return files


def ensure_node_key(path: Path) -> Path:
    """The site's persistent identity: an EC P-384 key pair (`path`, `path.pub`), made once."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pub = path.with_name(path.name + ".pub")
    if path.is_file() and pub.is_file():
        return path
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(
        path,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
    )
    pub.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        + f" chronorisk-{path.name}\n".encode()
    )
    return path


# ---- processes -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def tool_env(layout: Layout, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of every Flower process: telemetry and update checks off, venv tools first on PATH."""
    from chronorisk.environment import TELEMETRY_OFF, tool_homes

    env = dict(os.environ)
    env.update(TELEMETRY_OFF)
    env.update(tool_homes(layout.work))
    env.update(FLOWER_ENV)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.update(bytecode_env(layout, env))
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(extra or {})
    return env


def bytecode_env(layout: Layout, env: dict[str, str]) -> dict[str, str]:
    """Where the Flower processes keep compiled bytecode (`tool_env` also drops `PYTHONDONTWRITEBYTECODE`).

    Every message starts a fresh `flwr-clientapp` process, which imports Flower,
    LightGBM and polars. Without cached bytecode (the environment says
    `PYTHONDONTWRITEBYTECODE` and the packages were installed uncompiled) each
    of those processes compiled every module from source: 5.4 s of CPU per
    message and site, against 1.5 s with the cache (measured). Bytecode goes
    next to the installed packages when they hold or may hold it (compiled at
    install, as `make setup` does, or a writable environment: shared by every
    work folder); otherwise under `<work>/federated/pycache`
    (`PYTHONPYCACHEPREFIX`, which Python then reads instead of `__pycache__`).
    A prefix the user set is kept.
    """
    if env.get("PYTHONPYCACHEPREFIX"):
        return {"PYTHONPYCACHEPREFIX": env["PYTHONPYCACHEPREFIX"]}
    if packages_hold_bytecode():
        return {}
    return {"PYTHONPYCACHEPREFIX": str(layout.root / "pycache")}


def packages_hold_bytecode() -> bool:
    """True if Flower's installed package has compiled bytecode, or Python may write it there."""
    import importlib.util

    spec = importlib.util.find_spec("flwr")  # finds the package without importing it
    if spec is None or not spec.origin:
        return False
    package = Path(spec.origin).parent
    return (package / "__pycache__").is_dir() or os.access(package, os.W_OK)


WARM_IMPORTS = (
    "flwr.supernode.cli", "flwr.cli.app", "flwr.serverapp", "lightgbm", "polars",
    "chronorisk.federated.client_app", "chronorisk.federated.site", "chronorisk.federated.protocol",
    "chronorisk.federated.pipeline", "chronorisk.features.pipeline", "chronorisk.features.labels",
    "chronorisk.data.meds_io", "mlflow", "chronorisk.training.tracking",
)


def warm_bytecode(layout: Layout) -> subprocess.Popen:
    """Compile what the ClientApp, ServerApp and Flower CLI import, once, into the bytecode cache.

    Started in the background by `up` while the SuperLink starts, so the
    first message does not pay for it five times over (once per site).
    """
    code = "import importlib, sys\nsys.modules['sklearn'] = None\n" + "".join(
        f"try:\n    importlib.import_module({m!r})\nexcept Exception:\n    pass\n" for m in WARM_IMPORTS
    )
    return _spawn([sys.executable, "-c", code], tool_env(layout), layout.logs / "warm-bytecode.log", layout.root)


def flower_bin(name: str) -> str:
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(FileNotFoundError, IndexError, OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def stop_process_group(pid: int, timeout_s: float = 10.0) -> None:
    """SIGTERM the group led by `pid` (a process we started with its own session), then SIGKILL."""
    stop_process_groups([pid], timeout_s)


def stop_process_groups(pids: list[int], timeout_s: float = 10.0) -> None:
    """SIGTERM every group at once, wait for all of them, then SIGKILL what is left."""
    pids = [p for p in pids if p]
    for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, sig)
        end = time.monotonic() + wait
        while time.monotonic() < end:
            for pid in pids:  # reap our own children, or they linger as zombies and keep the group "alive"
                with contextlib.suppress(ChildProcessError, OSError):
                    os.waitpid(pid, os.WNOHANG)
            pids = [p for p in pids if pid_alive(p) or _group_alive(p)]
            if not pids:
                return
            time.sleep(0.1)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_state(layout: Layout) -> dict:
    if not layout.state.is_file():
        return {}
    try:
        return json.loads(layout.state.read_text())
    except json.JSONDecodeError:
        return {}


def write_state(layout: Layout, state: dict) -> None:
    write_text_atomic(layout.state, json.dumps(state, indent=1, sort_keys=True))


def superlink_command(layout: Layout, certs: dict[str, Path], port: int) -> list[str]:
    return [
        flower_bin("flower-superlink"),
        "--ssl-ca-certfile", str(certs["ca"]),
        "--ssl-certfile", str(certs["cert"]),
        "--ssl-keyfile", str(certs["key"]),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--database", str(layout.superlink_db),
        "--host", "127.0.0.1",
        "--port", str(port),
    ]


def supernode_command(layout: Layout, site: str, *, superlink_port: int, runtime_port: int,
                      meds_root: Path, key: Path | None = None, labels: Path | None = None) -> list[str]:
    node_config = (
        f'site="{site}" meds="{meds_root}" cache="{layout.node_dir(site) / "cache"}"'
        + (f' labels="{labels}"' if labels is not None else "")  # the site's own supplied labels
    )
    return [
        flower_bin("flower-supernode"),
        "--root-certificates", str(layout.certs / "ca.crt"),
        "--superlink", f"127.0.0.1:{superlink_port}",
        "--auth-supernode-private-key", str(key or layout.key(site)),
        "--node-config", node_config,
        "--host", "127.0.0.1",
        "--port", str(runtime_port),
    ]


def _spawn(cmd: list[str], env: dict[str, str], log_path: Path, cwd: Path | None = None) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        out.write(f"\n=== {dt.datetime.now().isoformat(timespec='seconds')} start\n".encode())
        return subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, cwd=str(cwd) if cwd else None,
        )


# ---- Flower CLI connection and registration --------------------------------------------


def write_connection(layout: Layout, port: int) -> Path:
    """`[superlink.chronorisk]` in `$FLWR_HOME/config.toml`, the default connection of the Flower CLI."""
    import tomli_w

    path = layout.flwr_home / "config.toml"
    config = {
        "superlink": {
            "default": CONNECTION,
            CONNECTION: {
                "address": f"127.0.0.1:{port}",
                "root-certificates": str(layout.certs / "ca.crt"),
            },
        }
    }
    write_text_atomic(path, tomli_w.dumps(config))
    return path


def flwr_cli(layout: Layout, *args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run(
        [flower_bin("flwr"), *args], env=tool_env(layout), capture_output=True, text=True,
        timeout=timeout_s, cwd=str(layout.root), check=False,
    )


def registered_nodes(layout: Layout) -> list[dict]:
    """`flwr supernode ls --format json`: the SuperLink's registered nodes and their status."""
    proc = flwr_cli(layout, "supernode", "ls", CONNECTION, "--format", "json")
    if proc.returncode != 0:
        raise DeploymentError(f"flwr supernode ls failed: {_tail(proc.stdout + proc.stderr)}")
    data = _json_from(proc.stdout)
    nodes = data.get("nodes", []) if isinstance(data, dict) else []
    return [n for n in nodes if isinstance(n, dict)]


def register_node(layout: Layout, site: str) -> None:
    """Register the site's public key with the SuperLink (already registered is fine)."""
    pub = layout.key(site).with_name(site + ".pub")
    proc = flwr_cli(layout, "supernode", "register", str(pub), CONNECTION, "--name", site, "--format", "json")
    text = proc.stdout + proc.stderr
    if proc.returncode != 0 and "already" not in text.lower():
        raise DeploymentError(f"registering site {site} failed: {_tail(text)}")


def _json_from(text: str) -> dict:
    start = text.find("{")
    if start < 0:
        return {}
    try:
        return json.loads(text[start:])
    except json.JSONDecodeError:
        return {}


def _tail(text: str, n: int = 400) -> str:
    text = " ".join(text.split())
    return text[-n:]


# ---- up / supervise / down ---------------------------------------------------------------


def up(layout: Layout, sites: list[str], meds_root: Path, *, superlink_port: int = 0,
       task_poll_interval_s: float = 0.2, wait_s: float = 120.0, labels: Path | None = None) -> dict:
    """Start SuperLink + supervised SuperNodes; return the state once every site is online."""
    state = read_state(layout)
    if state and pid_alive(state.get("supervisor", {}).get("pid")):
        raise DeploymentError(
            f"a federation is already running from {layout.root} (supervisor pid "
            f"{state['supervisor']['pid']}); run `chronorisk federated down` first"
        )
    if not sites:
        raise DeploymentError(f"no site found under {meds_root}/sites (run `chronorisk generate` first)")
    layout.root.mkdir(parents=True, exist_ok=True)
    layout.flwr_home.mkdir(parents=True, exist_ok=True)
    certs = ensure_certificates(layout.certs)
    for site in sites:
        ensure_node_key(layout.key(site))
    port = superlink_port or free_port()
    if port_open(port):
        raise DeploymentError(f"port {port} on 127.0.0.1 is taken; set federated.superlink_port")
    state = {
        "work": str(layout.work),
        "meds": str(meds_root),
        "labels": str(labels) if labels is not None else None,
        "superlink": {"port": port, "pid": None},
        "sites": {s: {"port": free_port(), "pid": None, "restarts": 0, "status": "starting"} for s in sites},
        "task_poll_interval_s": task_poll_interval_s,
        "started_at": dt.datetime.now().isoformat(timespec="seconds"),
    }
    write_connection(layout, port)
    link_env = tool_env(layout, {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": str(task_poll_interval_s)})
    warm = warm_bytecode(layout)
    link = _spawn(superlink_command(layout, certs, port), link_env, layout.logs / "superlink.log", layout.root)
    state["superlink"]["pid"] = link.pid
    write_state(layout, state)
    try:
        _wait(lambda: port_open(port), 60, "the SuperLink did not open its port", proc=link)
        with contextlib.suppress(subprocess.TimeoutExpired):  # a slow compile only makes the first message slower
            warm.wait(timeout=120)
        for site in sites:
            register_node(layout, site)
    except Exception:
        stop_process_group(link.pid)
        raise
    sup = _spawn(
        [sys.executable, "-m", "chronorisk.federated.deploy", "supervise", str(layout.work)],
        tool_env(layout), layout.logs / "supervisor.log", layout.root,
    )
    state["supervisor"] = {"pid": sup.pid}
    write_state(layout, state)
    try:
        wait_online(layout, sites, wait_s)
    except DeploymentError:
        down(layout)
        raise
    return read_state(layout)


def wait_online(layout: Layout, sites: list[str], wait_s: float) -> None:
    """Until the SuperLink lists as many online nodes as there are sites (or `wait_s` passes)."""
    deadline = time.monotonic() + wait_s
    online = 0
    while time.monotonic() < deadline:
        with contextlib.suppress(DeploymentError, subprocess.TimeoutExpired):
            online = sum(1 for n in registered_nodes(layout) if n.get("status") == "online")
            if online >= len(sites):
                return
        time.sleep(1.0)
    raise DeploymentError(f"only {online} of {len(sites)} SuperNodes came online within {wait_s:.0f} s")


def _wait(check, timeout_s: float, problem: str, proc: subprocess.Popen | None = None) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if check():
            return
        if proc is not None and proc.poll() is not None:
            raise DeploymentError(f"{problem} (it exited with code {proc.returncode}; see the logs)")
        time.sleep(0.2)
    raise DeploymentError(f"{problem} within {timeout_s:.0f} s")


class Supervisor:
    """Keeps one SuperNode per site (and the SuperLink) running; restarts what dies, with back-off."""

    def __init__(self, layout: Layout, poll_s: float = 0.5, max_backoff_s: float = 10.0):
        self.layout = layout
        self.poll_s = poll_s
        self.max_backoff_s = max_backoff_s
        self.procs: dict[str, subprocess.Popen] = {}
        self.next_start: dict[str, float] = {}
        self.backoff: dict[str, float] = {}
        self.stopping = False

    def _env(self) -> dict[str, str]:
        state = read_state(self.layout)
        return tool_env(self.layout, {
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": str(state.get("task_poll_interval_s", 0.2)),
        })

    def _start(self, name: str, state: dict) -> None:
        port = state["superlink"]["port"]
        if name == "superlink":
            certs = ensure_certificates(self.layout.certs)
            cmd = superlink_command(self.layout, certs, port)
            log_path = self.layout.logs / "superlink.log"
            env = self._env()
        else:
            info = state["sites"][name]
            home = self.layout.node_dir(name) / "flwr"
            home.mkdir(parents=True, exist_ok=True)
            cmd = supernode_command(
                self.layout, name, superlink_port=port, runtime_port=info["port"], meds_root=Path(state["meds"]),
                labels=Path(state["labels"]) if state.get("labels") else None,
            )
            log_path = self.layout.logs / f"supernode-{name}.log"
            env = {**self._env(), "FLWR_HOME": str(home)}
        self.procs[name] = _spawn(cmd, env, log_path, self.layout.root)
        log.info("started %s (pid %d)", name, self.procs[name].pid)

    def _record(self, state: dict) -> None:
        fresh = read_state(self.layout)
        if not fresh:
            return
        for name, proc in self.procs.items():
            alive = proc.poll() is None
            if name == "superlink":
                fresh["superlink"]["pid"] = proc.pid if alive else None
            elif name in fresh.get("sites", {}):
                entry = fresh["sites"][name]
                entry["pid"] = proc.pid if alive else None
                entry["status"] = "running" if alive else "restarting"
                entry["restarts"] = state["sites"][name].get("restarts", 0)
        fresh["supervisor"] = {"pid": os.getpid()}
        write_state(self.layout, fresh)

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        state = read_state(self.layout)
        link_pid = state.get("superlink", {}).get("pid")
        for site in state.get("sites", {}):
            self._start(site, state)
        self._record(state)
        while not self.stopping:
            time.sleep(self.poll_s)
            changed = False
            if link_pid and not pid_alive(link_pid) and "superlink" not in self.procs:
                log.warning("the SuperLink (pid %s) exited; restarting it", link_pid)
                self._start("superlink", state)
                changed = True
            for name, proc in list(self.procs.items()):
                if proc.poll() is None or self.stopping:
                    continue
                now = time.monotonic()
                if name not in self.next_start:
                    delay = self.backoff.get(name, 0.5)
                    self.backoff[name] = min(delay * 2, self.max_backoff_s)
                    self.next_start[name] = now + delay
                    log.warning("%s exited with code %s; restarting in %.1f s", name, proc.returncode, delay)
                    if name in state["sites"]:
                        state["sites"][name]["restarts"] = state["sites"][name].get("restarts", 0) + 1
                    changed = True
                elif now >= self.next_start[name]:
                    del self.next_start[name]
                    self._start(name, state)
                    changed = True
            for name, proc in self.procs.items():  # a node that has stayed up 30 s has recovered
                if proc.poll() is None and self.backoff.get(name, 0) > 0.5 and name not in self.next_start:
                    started = _started_at(proc.pid)
                    if started is not None and time.time() - started > 30:
                        self.backoff[name] = 0.5
            if changed:
                self._record(state)
        self._shutdown()

    def _stop(self, *_args) -> None:
        self.stopping = True

    def _shutdown(self) -> None:
        stop_process_groups([proc.pid for name, proc in self.procs.items() if name != "superlink"])
        state = read_state(self.layout)
        link_pid = (self.procs["superlink"].pid if "superlink" in self.procs
                    else state.get("superlink", {}).get("pid"))
        if link_pid:
            stop_process_group(link_pid)
        if state:
            state["stopped_at"] = dt.datetime.now().isoformat(timespec="seconds")
            for entry in state.get("sites", {}).values():
                entry["pid"] = None
                entry["status"] = "stopped"
            state["superlink"]["pid"] = None
            state["supervisor"] = {"pid": None}
            write_state(self.layout, state)


def _started_at(pid: int) -> float | None:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:
        return None


def down(layout: Layout, timeout_s: float = 30.0) -> list[str]:
    """Stop the supervisor (which stops its SuperNodes and the SuperLink); clean up leftovers."""
    state = read_state(layout)
    stopped = []
    sup = state.get("supervisor", {}).get("pid")
    if sup and pid_alive(sup):
        with contextlib.suppress(ProcessLookupError):
            os.kill(sup, signal.SIGTERM)
        end = time.monotonic() + timeout_s
        while time.monotonic() < end and pid_alive(sup):
            time.sleep(0.2)
        if pid_alive(sup):
            stop_process_group(sup, timeout_s=1.0)
        stopped.append(f"supervisor {sup}")
    state = read_state(layout)
    leftovers = {site: e["pid"] for site, e in state.get("sites", {}).items() if e.get("pid") and pid_alive(e["pid"])}
    stop_process_groups(list(leftovers.values()))
    stopped.extend(f"supernode {site} {pid}" for site, pid in leftovers.items())
    link = state.get("superlink", {}).get("pid")
    if link and pid_alive(link):
        stop_process_group(link)
        stopped.append(f"superlink {link}")
    if state:
        for entry in state.get("sites", {}).values():
            entry["pid"] = None
            entry["status"] = "stopped"
        if "superlink" in state:
            state["superlink"]["pid"] = None
        state["supervisor"] = {"pid": None}
        write_state(layout, state)
    return stopped


def status(layout: Layout) -> dict:
    """state.json with liveness checked now."""
    state = read_state(layout)
    if not state:
        return {}
    state["supervisor_alive"] = pid_alive(state.get("supervisor", {}).get("pid"))
    state["superlink_alive"] = pid_alive(state.get("superlink", {}).get("pid"))
    for entry in state.get("sites", {}).values():
        entry["alive"] = pid_alive(entry.get("pid"))
    return state


APP_NAME = "chronorisk-federated"
APP_PYPROJECT = """[build-system]
requires = ["setuptools>=77"]
build-backend = "setuptools.build_meta"

[project]
name = "chronorisk-federated"
version = "1.0.0"
description = "chronorisk federated training: the code is the installed chronorisk package"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "chronorisk"

[tool.flwr.app.components]
serverapp = "chronorisk.federated.server_app:app"
clientapp = "chronorisk.federated.client_app:app"

[tool.flwr.app.config]
work = ""
params = ""
tag = ""
strategy = ""
rounds = 0
"""


def write_app(layout: Layout) -> Path:
    """The Flower App folder `flwr run` bundles: only a pyproject.toml naming our ServerApp and ClientApp.

    No code travels in the bundle: every party runs the chronorisk package it
    has installed (runtime dependency installation is off everywhere).
    """
    app = layout.root / "app" / APP_NAME
    write_text_atomic(app / "pyproject.toml", APP_PYPROJECT)
    return app


def _toml_string(value: str) -> str:
    if '"' in value or "\\" in value or "\n" in value:
        raise DeploymentError(f"path {value!r} cannot be passed to Flower (quotes or backslashes)")
    return f'"{value}"'


def submit_run(layout: Layout, *, params_path: Path | None, strategy: str | None = None,
               rounds: int | None = None, timeout_s: float = 1800.0) -> dict:
    """`flwr run` the chronorisk app on the running federation; wait for its result.json."""
    state = status(layout)
    if not state or not state.get("supervisor_alive") or not state.get("superlink_alive"):
        raise DeploymentError("no federation is running here: start one with `chronorisk federated up`")
    app = write_app(layout)
    tag = f"{dt.datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}"
    run_dir = layout.root / "runs" / tag
    run_dir.mkdir(parents=True, exist_ok=True)
    config = [f"work={_toml_string(str(layout.work))}", f"tag={_toml_string(tag)}"]
    if params_path is not None:
        config.append(f"params={_toml_string(str(Path(params_path).resolve()))}")
    if strategy:
        config.append(f"strategy={_toml_string(strategy)}")
    if rounds:
        config.append(f"rounds={int(rounds)}")
    cmd = [flower_bin("flwr"), "run", str(app), CONNECTION, "--run-config", " ".join(config), "--stream"]
    started = time.monotonic()
    with open(run_dir / "flwr-run.log", "wb") as out:
        proc = subprocess.Popen(cmd, env=tool_env(layout), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=str(layout.root), start_new_session=True)
        try:
            final = _await_run(run_dir, proc, timeout_s)
        finally:
            if proc.poll() is None:
                stop_process_group(proc.pid, timeout_s=5.0)
    final["submit_wall_s"] = round(time.monotonic() - started, 3)
    final["tag"] = tag
    final["log"] = str(run_dir / "flwr-run.log")
    return final


def _await_run(run_dir: Path, proc: subprocess.Popen, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    status_file = run_dir / "status.json"
    exited_at = None
    while time.monotonic() < deadline:
        current = _json_file(status_file)
        if current.get("status") == "finished":
            result = _json_file(run_dir / "result.json")
            return {**result, "status": "finished"}
        if current.get("status") == "failed":
            raise DeploymentError(f"the federated run failed: {current.get('error', 'unknown error')}")
        if proc.poll() is not None:
            exited_at = exited_at or time.monotonic()
            if time.monotonic() - exited_at > 10:
                tail = _tail((run_dir / "flwr-run.log").read_text(errors="replace"), 600)
                raise DeploymentError(f"`flwr run` ended (code {proc.returncode}) without a result: {tail}")
        time.sleep(0.5)
    raise DeploymentError(f"the federated run did not finish within {timeout_s:.0f} s (see {run_dir})")


def _json_file(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "supervise":
        print("usage: python -m chronorisk.federated.deploy supervise WORK", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    Supervisor(Layout(Path(argv[1]))).run()
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
