"""Same inputs, parameters and seed: byte-identical model, calibrator and data fingerprint, whatever the
order of the input files and of their rows (MEDS shards and label files)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from chronorisk.config import load_params
from chronorisk.data.meds_io import write_labels
from chronorisk.training.train import compute_task_data, train_task

REPO = Path(__file__).resolve().parents[2]
TASK = "cvd_10y"


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("repro")
    proc = subprocess.run([sys.executable, str(REPO / "docs" / "examples" / "make_byod_example.py"), "--out",
                           str(root), "--subjects", "1200", "--seed", "5"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    return root


def shuffled_copy(src: Path, dst: Path, seed: int) -> None:
    """The same MEDS data and labels, rows shuffled and cut into files named in another order."""
    rng = np.random.default_rng(seed)
    for site_dir in sorted((src / "meds" / "sites").iterdir()):
        out = dst / "meds" / "sites" / site_dir.name
        (out / "data").mkdir(parents=True)
        (out / "metadata").mkdir()
        for f in (site_dir / "metadata").iterdir():
            table = pl.read_parquet(f) if f.suffix == ".parquet" else None
            if table is not None:
                table.sample(fraction=1.0, shuffle=True, seed=seed).write_parquet(out / "metadata" / f.name)
            else:
                (out / "metadata" / f.name).write_bytes(f.read_bytes())
        events = pl.concat([pl.read_parquet(f) for f in sorted((site_dir / "data").glob("*.parquet"))])
        events = events[rng.permutation(events.height)]
        cut = events.height // 3
        for name, part in (("z.parquet", events[:cut]), ("a.parquet", events[cut:])):
            part.write_parquet(out / "data" / name)
    labels = pl.read_parquet(src / "labels" / TASK / "labels.parquet")
    labels = labels[rng.permutation(labels.height)]
    half = labels.height // 2
    write_labels(labels[half:], dst / "labels" / TASK / "first.parquet")
    write_labels(labels[:half], dst / "labels" / TASK / "second.parquet")
    (dst / f"{TASK}.yaml").write_bytes((src / f"{TASK}.yaml").read_bytes())


def _train(root: Path, kind: str) -> tuple[str, str, str]:
    params = load_params(REPO / "params.yaml")
    model = params.model.model_copy(update={"kind": kind, "num_boost_round": 150})
    data = compute_task_data(root / "meds", str(root / f"{TASK}.yaml"), params.features, labels=root / "labels")
    bundle = train_task(data, model, params.train).bundle
    return (bundle.booster.model_to_string(), json.dumps(bundle.calibrator.to_dict(), sort_keys=True),
            bundle.metadata["data_fingerprint"])


@pytest.mark.parametrize("kind", ["lightgbm", "logistic"])
def test_shuffled_files_and_rows_give_the_same_bytes(example, tmp_path, kind):
    shuffled_copy(example, tmp_path / "s1", seed=1)
    shuffled_copy(example, tmp_path / "s2", seed=2)
    first = _train(example, kind)
    assert _train(tmp_path / "s1", kind) == first
    assert _train(tmp_path / "s2", kind) == first
    assert first[0] and first[2].startswith("sha256:")
