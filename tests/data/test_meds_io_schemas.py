"""meds_io writes MEDS without importing `meds`: its layout and arrow schemas must be the `meds` package's.

The package stays the one source of truth: these tests fail when an upgrade of `meds` changes a schema,
a split name or a path, and writing a dataset does not import it (a subprocess, as the CLI runs).
"""

from __future__ import annotations

import subprocess
import sys

import meds
import pytest

from chronorisk.data import meds_io


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (meds_io.DATA_ARROW_SCHEMA, meds.DataSchema),
        (meds_io.SUBJECT_SPLIT_ARROW_SCHEMA, meds.SubjectSplitSchema),
        (meds_io.CODE_METADATA_ARROW_SCHEMA, meds.CodeMetadataSchema),
        (meds_io.LABEL_ARROW_SCHEMA, meds.LabelSchema),
    ],
    ids=["data", "subject_splits", "codes", "labels"],
)
def test_arrow_schemas_are_the_meds_packages(ours, theirs):
    assert ours.equals(theirs.schema(), check_metadata=True)
    # nullability, nested fields and metadata of every field too
    for mine, reference in zip(ours, theirs.schema(), strict=True):
        assert mine.equals(reference, check_metadata=True), mine.name


def test_layout_split_names_and_version_are_the_meds_packages():
    assert (meds.train_split, meds.tuning_split, meds.held_out_split) == meds_io.SPLITS
    assert meds.data_subdirectory == meds_io.DATA_SUBDIRECTORY
    assert meds.code_metadata_filepath == meds_io.CODE_METADATA_FILEPATH
    assert meds.subject_splits_filepath == meds_io.SUBJECT_SPLITS_FILEPATH
    assert meds.dataset_metadata_filepath == meds_io.DATASET_METADATA_FILEPATH
    assert meds_io.meds_version() == meds.__version__


def test_writing_a_dataset_does_not_import_meds(tmp_path):
    code = (
        "import sys, polars as pl\n"
        "from chronorisk.data import meds_io\n"
        "meds_io.write_events(pl.DataFrame({'subject_id': [1], 'code': ['MEDS_BIRTH']}), "
        f"meds_io.site_root({str(tmp_path)!r}, 's') / 'data' / '0.parquet')\n"
        f"meds_io.write_metadata(meds_io.site_root({str(tmp_path)!r}, 's'), dataset_name='d', etl_name='e', "
        "subject_ids=[1], code_descriptions={'MEDS_BIRTH': None})\n"
        "print('meds' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
    meds_io.validate_site(tmp_path, "s")  # and what it wrote is valid for the package
