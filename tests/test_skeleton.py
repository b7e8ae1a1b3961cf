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


def test_sections_name_every_params_section_with_its_model():
    from chronorisk.params_file import SECTIONS

    assert list(SECTIONS) == list(Params.model_fields)
    for name, (module, model) in SECTIONS.items():
        assert Params.model_fields[name].annotation is getattr(__import__(module, fromlist=[model]), model)


def test_one_section_is_validated_as_the_whole_file_would(tmp_path):
    from chronorisk.params_file import load_section

    repo_params = __import__("pathlib").Path(__file__).resolve().parents[1] / "params.yaml"
    assert load_section(repo_params, "ingest") == load_params(repo_params).ingest
    assert load_section(None, "ingest") == Params().ingest
    params = tmp_path / "params.yaml"
    params.write_text("generate:\n  patients: 10\n")  # no ingest section: its defaults
    assert load_section(params, "ingest") == Params().ingest
    params.write_text("ingest:\n  workers: 3\n")
    assert load_section(params, "ingest").workers == 3


@pytest.mark.parametrize(("text", "named"), [
    ("ingest:\n  wokers: 2\n", r"ingest\.wokers: Extra inputs"),
    ("ingest:\n  workers: 0\n", r"ingest\.workers: Input should be greater than or equal to 1"),
    ("ingset:\n  workers: 2\n", r"ingset: Extra inputs"),  # an unknown section, whichever command reads the file
    ("ingest: [1, 2]\n", r"ingest: Input should be a valid dictionary"),
])
def test_one_section_errors_name_the_key(tmp_path, text, named):
    from chronorisk.params_file import load_section

    params = tmp_path / "params.yaml"
    params.write_text(text)
    with pytest.raises(ConfigError, match=named):
        load_section(params, "ingest")


def test_cli_ingest_validates_its_section_alone_and_names_a_typo(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("ingest:\n  max_text_kb: 64\n")
    out = subprocess.run(
        [sys.executable, "-m", "chronorisk.cli", "--params", str(params), "--work", str(tmp_path / "w"), "ingest",
         "--demo"],
        capture_output=True, text=True,
    )
    assert out.returncode == 2
    assert "ingest.max_text_kb: Extra inputs are not permitted" in out.stderr
    assert "Traceback" not in out.stderr
