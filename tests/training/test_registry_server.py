"""`--tracking-uri http://...`: the registry through a real MLflow tracking server (artifacts proxied).

Starts `mlflow server` on a free loopback port with its own SQLite store and
artifact folder under tmp_path, stops its whole process group afterwards.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from chronorisk.paths import WorkPaths
from chronorisk.training import registry, tracking

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    cmd = [
        str(Path(sys.executable).parent / "mlflow"), "server",
        "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
        "--artifacts-destination", str(root / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=(root / "server.log").open("w"),
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(1)
        yield url, root
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_register_and_fetch_through_a_tracking_server(server, tmp_path):
    url, root = server
    paths = WorkPaths(tmp_path / "work")
    track = tracking.configure_tracking(paths, uri=tracking.resolve_tracking_uri(paths, url), experiment="srv")
    assert track.artifact_location.startswith("mlflow-artifacts:")  # the server decides where artifacts go
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "bundle.json").write_text('{"feature_names": ["a", "b"]}')
    (bundle / "booster.txt").write_text("tree")
    reg = registry.register_bundle(track, bundle, task="srv")
    registry.set_alias(track, "srv", "champion", reg.version)

    local, found = registry.fetch_bundle("srv", paths=paths, tracking_uri=url)
    assert found.version == 1
    assert (local / "booster.txt").read_text() == "tree"
    # nothing of the run went to the work folder but the download cache; the server holds the artifacts
    assert not (paths.mlflow_dir / "mlflow.db").exists()
    assert any((root / "artifacts").rglob("booster.txt"))
