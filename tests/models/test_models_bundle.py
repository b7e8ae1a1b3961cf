"""Model bundle: save/load round trip, atomic replacement, corrupt parts named, column selection."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from models_support import NAMES, frame

from chronorisk.errors import InputError
from chronorisk.models.bundle import BundleError, ModelBundle, data_fingerprint
from chronorisk.models.config import TierThresholds


@pytest.fixture
def bundle(fitted, spec, task, data):
    return ModelBundle.from_model(
        fitted, spec, task, TierThresholds(medium=0.1, high=0.25), version=3,
        data_fingerprint=data_fingerprint(frame(data["train"][0])), metrics={"auroc": 0.8},
    )


@pytest.fixture
def saved(bundle, tmp_path):
    return bundle.save(tmp_path / "models" / "complication_1y")


def test_round_trip_gives_identical_predictions_and_explanations(bundle, saved, data):
    df = frame(data["test"][0][:200])
    loaded = ModelBundle.load(saved)
    np.testing.assert_array_equal(loaded.predict_risk(df), bundle.predict_risk(df))
    np.testing.assert_array_equal(loaded.predict_raw(df), bundle.predict_raw(df))
    assert list(loaded.tier(loaded.predict_risk(df))) == list(bundle.tier(bundle.predict_risk(df)))
    assert loaded.explain(df, 3) == bundle.explain(df, 3)
    assert sorted(p.name for p in saved.iterdir()) == [
        "booster.txt", "bundle.json", "calibrator.json", "spec.json", "task.yaml"
    ]
    meta = loaded.metadata
    assert meta["name"] == "chronorisk-complication_1y" and meta["version"] == "3"
    assert meta["feature_names"] == list(NAMES)
    assert meta["data_fingerprint"].startswith("sha256:")
    assert meta["versions"]["lightgbm"] and meta["trained_at"]
    assert meta["metrics"] == {"auroc": 0.8}
    assert loaded.tiers == TierThresholds(medium=0.1, high=0.25)
    assert loaded.task.name == "complication_1y" and loaded.spec == bundle.spec


def test_save_replaces_an_older_bundle_atomically(bundle, saved):
    bundle.metadata["version"] = "4"
    bundle.save(saved)
    assert ModelBundle.load(saved).version == "4"
    leftovers = [p.name for p in saved.parent.iterdir() if p.name != saved.name]
    assert leftovers == []


def test_missing_folder_and_missing_file(saved, tmp_path):
    with pytest.raises(BundleError, match="no such folder"):
        ModelBundle.load(tmp_path / "nowhere")
    (saved / "calibrator.json").unlink()
    with pytest.raises(BundleError, match=r"missing calibrator\.json"):
        ModelBundle.load(saved)


@pytest.mark.parametrize("name", ["booster.txt", "calibrator.json", "spec.json", "task.yaml"])
def test_edited_part_is_reported_as_corrupt(saved, name):
    path = saved / name
    path.write_text(path.read_text()[:-40])
    with pytest.raises(BundleError, match=rf"{name.replace('.', '[.]')} is corrupt"):
        ModelBundle.load(saved)


def _rewrite(saved, name, text):
    """Replace a part and its checksum, as a buggy writer (not a disk error) would."""
    import hashlib

    (saved / name).write_text(text)
    meta = json.loads((saved / "bundle.json").read_text())
    meta["checksums"][name] = hashlib.sha256(text.encode()).hexdigest()
    (saved / "bundle.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("booster.txt", "tree\nnot a model\n", "booster.txt is not a LightGBM model"),
        ("calibrator.json", '{"method": "beta"}', "calibrator.json: calibrator method 'beta'"),
        ("calibrator.json", "{", "calibrator.json"),
        ("spec.json", '{"version": 1}', "spec.json"),
        ("task.yaml", "name: [", "task.yaml"),
    ],
)
def test_invalid_part_is_named(saved, name, text, message):
    _rewrite(saved, name, text)
    with pytest.raises(BundleError, match=message):
        ModelBundle.load(saved)


def test_bad_metadata(saved):
    (saved / "bundle.json").write_text("{not json")
    with pytest.raises(BundleError, match=r"bundle\.json is not valid JSON"):
        ModelBundle.load(saved)
    (saved / "bundle.json").write_text(json.dumps({"bundle_format": 99}))
    with pytest.raises(BundleError, match="bundle_format 99"):
        ModelBundle.load(saved)


def test_cli_shows_bundle_errors_as_one_line(saved):
    from chronorisk.errors import ChronoriskError

    (saved / "task.yaml").unlink()
    with pytest.raises(ChronoriskError) as info:
        ModelBundle.load(saved)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("rows", [1, 3, 20])  # few rows are read row-wise, more column-wise
def test_feature_table_columns_selected_by_name(bundle, data, rows):
    df = frame(data["test"][0][:rows]).with_columns(pl.lit(7).alias("subject_id"), pl.lit("north").alias("site"))
    np.testing.assert_array_equal(bundle.matrix(df), data["test"][0][:rows].astype(np.float32).astype(np.float64))
    shuffled = df.select(list(reversed(df.columns)))
    np.testing.assert_array_equal(bundle.predict_risk(shuffled), bundle.predict_risk(df))
    np.testing.assert_allclose(bundle.predict_risk(df.to_pandas()), bundle.predict_risk(df))
    with pytest.raises(InputError, match="sbp_last"):
        bundle.predict_risk(df.drop("sbp_last"))
    with pytest.raises(InputError, match="numeric"):
        bundle.predict_risk(df.with_columns(pl.lit("x").alias("age")))
    assert bundle.predict_risk(df.head(0)).shape == (0,)
    assert bundle.explain(df.head(0), 3) == []


def test_bundle_refuses_a_model_trained_on_other_columns(fitted, task):
    from models_support import make_spec

    with pytest.raises(BundleError, match="other columns"):
        ModelBundle.from_model(fitted, make_spec(NAMES[:-1]), task, TierThresholds())


def test_fingerprint_is_stable_and_sensitive(data):
    df = frame(data["train"][0][:100])
    assert data_fingerprint(df) == data_fingerprint(df.clone())
    changed = df.with_columns(pl.when(pl.int_range(pl.len()) == 5).then(99.0).otherwise(pl.col("age")).alias("age"))
    assert data_fingerprint(changed) != data_fingerprint(df)
