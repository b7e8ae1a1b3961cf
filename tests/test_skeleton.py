"""The CLI and config glue: errors are one line, never a traceback."""

import subprocess
import sys

import pytest

from chronorisk.config import Params, load_params
from chronorisk.errors import ConfigError


def test_params_yaml_parses(tmp_path):
    params = load_params(__import__("pathlib").Path(__file__).resolve().parents[1] / "params.yaml")
    assert isinstance(params, Params)
    assert len(params.generate.sites) >= 5


def test_unknown_key_is_named(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("generate:\n  patiens: 10\n")
    with pytest.raises(ConfigError, match=r"generate\.patiens"):
        load_params(bad)


def test_cli_bad_params_exits_cleanly(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("generate:\n  patients: -5\n")
    out = subprocess.run(
        [sys.executable, "-m", "chronorisk.cli", "--params", str(bad), "--work", str(tmp_path / "w"), "summary"],
        capture_output=True, text=True,
    )
    assert out.returncode == 2
    assert "generate.patients" in out.stderr
    assert "Traceback" not in out.stderr
