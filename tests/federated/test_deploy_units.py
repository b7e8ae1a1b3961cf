"""Deployment pieces without Flower processes: certificates, node keys, CLI connection, process control."""

from __future__ import annotations

import ipaddress
import os
import stat
import subprocess
import sys
import time

import pytest
import tomli
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from chronorisk.federated import deploy


def test_certificates_chain_to_the_ca_and_cover_loopback(tmp_path):
    files = deploy.ensure_certificates(tmp_path / "certs")
    ca = x509.load_pem_x509_certificate(files["ca"].read_bytes())
    cert = x509.load_pem_x509_certificate(files["cert"].read_bytes())
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in sans.get_values_for_type(x509.IPAddress)
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert stat.S_IMODE(files["key"].stat().st_mode) == 0o600
    again = deploy.ensure_certificates(tmp_path / "certs")  # reused while valid
    assert again["cert"].read_bytes() == files["cert"].read_bytes()


def test_node_keys_are_persistent_p384_ssh_pairs(tmp_path):
    key = deploy.ensure_node_key(tmp_path / "keys" / "north")
    private = load_ssh_private_key(key.read_bytes(), None)
    public = load_ssh_public_key(key.with_name("north.pub").read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert public.public_numbers() == private.public_key().public_numbers()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    first = key.read_bytes()
    deploy.ensure_node_key(tmp_path / "keys" / "north")
    assert key.read_bytes() == first  # the identity survives restarts


def test_cli_connection_and_app(tmp_path):
    layout = deploy.Layout(tmp_path)
    path = deploy.write_connection(layout, 12345)
    conf = tomli.loads(path.read_text())
    assert conf["superlink"]["default"] == "chronorisk"
    assert conf["superlink"]["chronorisk"]["address"] == "127.0.0.1:12345"
    assert conf["superlink"]["chronorisk"]["root-certificates"].endswith("ca.crt")
    app = deploy.write_app(layout)
    pyproject = tomli.loads((app / "pyproject.toml").read_text())
    components = pyproject["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "chronorisk.federated.server_app:app",
                          "clientapp": "chronorisk.federated.client_app:app"}
    with pytest.raises(deploy.DeploymentError, match="quotes"):
        deploy._toml_string('a"b')


def test_supernode_command_carries_site_identity_and_tls(tmp_path):
    layout = deploy.Layout(tmp_path)
    cmd = deploy.supernode_command(layout, "north", superlink_port=9092, runtime_port=9100, meds_root=tmp_path / "m")
    joined = " ".join(cmd)
    assert "--root-certificates" in cmd and "--auth-supernode-private-key" in cmd and "--insecure" not in cmd
    assert 'site="north"' in joined and "127.0.0.1:9092" in joined
    link = deploy.superlink_command(layout, {"ca": tmp_path / "ca", "cert": tmp_path / "c", "key": tmp_path / "k"},
                                    9092)
    assert "--enable-supernode-auth" in link and "--disable-runtime-dependency-installation" in link


def test_stop_process_groups_ends_children_too(tmp_path):
    script = (
        "import subprocess, sys, time; "
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    time.sleep(1.0)
    deploy.stop_process_groups([proc.pid], timeout_s=5)
    proc.wait(timeout=5)
    assert not deploy.pid_alive(proc.pid)
    assert not deploy._group_alive(proc.pid)


def test_status_without_a_federation_and_run_refused(tmp_path):
    layout = deploy.Layout(tmp_path)
    assert deploy.status(layout) == {}
    assert deploy.down(layout) == []
    with pytest.raises(deploy.DeploymentError, match="federated up"):
        deploy.submit_run(layout, params_path=None)
    assert not deploy.pid_alive(None) and deploy.pid_alive(os.getpid())


def test_flower_processes_cache_bytecode(tmp_path, monkeypatch):
    layout = deploy.Layout(tmp_path / "work")
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    monkeypatch.delenv("PYTHONPYCACHEPREFIX", raising=False)
    monkeypatch.setattr(deploy, "packages_hold_bytecode", lambda: True)
    env = deploy.tool_env(layout)
    assert "PYTHONDONTWRITEBYTECODE" not in env and "PYTHONPYCACHEPREFIX" not in env
    # packages that neither hold bytecode nor may: a cache under the work folder, used by a real process
    monkeypatch.setattr(deploy, "packages_hold_bytecode", lambda: False)
    env = deploy.tool_env(layout)
    assert env["PYTHONPYCACHEPREFIX"] == str(layout.root / "pycache")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "fedmod.py").write_text("X = 1\n")
    subprocess.run([sys.executable, "-c", "import fedmod"], env={**env, "PYTHONPATH": str(tmp_path / "src")},
                   check=True, timeout=60)
    assert list((layout.root / "pycache").rglob("fedmod*.pyc"))
    assert not (tmp_path / "src" / "__pycache__").exists()
    monkeypatch.setenv("PYTHONPYCACHEPREFIX", str(tmp_path / "mine"))
    assert deploy.tool_env(layout)["PYTHONPYCACHEPREFIX"] == str(tmp_path / "mine")
    assert isinstance(deploy.packages_hold_bytecode(), bool)
