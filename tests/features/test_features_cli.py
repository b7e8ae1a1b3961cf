"""`chronorisk labels` and `chronorisk features` end to end, through the real CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import meds
import polars as pl
import pyarrow.parquet as pq
import pytest

from chronorisk.data.meds_io import write_metadata
from chronorisk.features.spec import FeatureSpec

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.random_meds import write_random_meds

SITES = ("site_a", "site_b")


def chronorisk(work: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "chronorisk.cli", "--work", str(work), *args],
        capture_output=True, text=True, timeout=300,
    )


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("meds")
    for i, site in enumerate(SITES):
        d = root / "sites" / site
        paths = write_random_meds(d, 300, seed=i, shard_size=150, first_id=1_000_000 * (i + 1))
        ids = pl.scan_parquet(paths).select(pl.col("subject_id").unique()).collect()["subject_id"]
        write_metadata(d, dataset_name=site, etl_name="test", subject_ids=ids, code_descriptions={})
    return root


@pytest.fixture(scope="module")
def built(root, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("work")
    out = chronorisk(work, "features", "--meds", str(root), "--chunk-subjects", "100")
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    (work / "features_stdout.txt").write_text(out.stdout)
    return work


def test_features_command_says_what_it_dropped(built):
    spec = FeatureSpec.load(built / "features" / "onset_2y" / "spec.json")
    dropped = spec.fit_info["dropped"]
    assert dropped["count"] == len(dropped["features"]) > 0
    assert not set(dropped["features"]) & set(spec.feature_names)
    printed = (built / "features_stdout.txt").read_text()
    assert f"onset_2y           dropped {dropped['count']} features that say nothing" in printed


def test_labels_command(root, tmp_path):
    out = chronorisk(tmp_path, "labels", "--meds", str(root), "--task", "onset_2y")
    assert out.returncode == 0, out.stderr
    for site in SITES:
        table = pq.read_table(tmp_path / "labels" / "onset_2y" / f"{site}.parquet")
        meds.LabelSchema.validate(table)
        assert table.num_rows > 0
    assert not (tmp_path / "features").exists()


def test_features_command_writes_spec_and_tables(root, built):
    for task in ("complication_1y", "onset_2y"):
        spec = FeatureSpec.load(built / "features" / task / "spec.json")
        assert spec.task == task
        for site in SITES:
            table = pl.read_parquet(built / "features" / task / f"{site}.parquet")
            labels = pl.read_parquet(built / "labels" / task / f"{site}.parquet")
            assert table.columns == [
                "subject_id", "prediction_time", "site", "split", "boolean_value", *spec.feature_names
            ]
            assert table.height == labels.height
            assert set(table["site"]) == {site}
            splits = pl.read_parquet(root / "sites" / site / "metadata" / "subject_splits.parquet")
            joined = table.join(splits, on="subject_id", suffix="_meta")
            assert (joined["split"] == joined["split_meta"]).all()


def test_features_from_given_labels_and_spec(root, built, tmp_path):
    spec = built / "features" / "onset_2y" / "spec.json"
    out = chronorisk(
        tmp_path, "features", "--meds", str(root), "--task", "onset_2y", "--labels", str(built / "labels"),
        "--spec", str(spec), "--sites", "site_b",
    )
    assert out.returncode == 0, out.stderr
    mine = pl.read_parquet(tmp_path / "features" / "onset_2y" / "site_b.parquet")
    theirs = pl.read_parquet(built / "features" / "onset_2y" / "site_b.parquet")
    assert mine.equals(theirs)
    assert not (tmp_path / "labels").exists()  # given labels are not re-extracted


def test_single_meds_dataset_from_elsewhere(root, tmp_path):
    # a plain MEDS dataset (data/ + metadata/) is one site named after its folder
    out = chronorisk(tmp_path, "features", "--meds", str(root / "sites" / "site_a"), "--task", "complication_1y")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "features" / "complication_1y" / "site_a.parquet").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("features", "--meds", "/nonexistent/meds"), "MEDS root does not exist"),
        (("labels", "--task", "nope"), "neither a built-in task"),
        (("features", "--sites", "mars"), "unknown site(s) mars"),
        (("features", "--labels", "/nonexistent/labels", "--task", "onset_2y"), "/nonexistent/labels does not exist"),
        (("features", "--spec", "/nonexistent/spec.json"), "feature spec file does not exist"),
    ],
)
def test_bad_arguments_exit_cleanly(root, tmp_path, args, message):
    argv = list(args)
    if "--meds" not in argv:
        argv += ["--meds", str(root)]
    out = chronorisk(tmp_path, *argv)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
    assert "Traceback" not in out.stderr
