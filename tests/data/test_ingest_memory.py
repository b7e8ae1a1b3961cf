"""Streaming: peak memory stays flat as the number of input files grows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import slow_scale

KEY = "chronorisk-test-key-0123456789"


def _ingest(folder: Path, work: Path) -> dict:
    params = work / "params.yaml"
    work.mkdir(parents=True, exist_ok=True)
    # the parent holds one output bucket at a time (duplicates are found per bucket): buckets of about
    # one copy of the sample, so that the larger input has more buckets, not larger ones
    params.write_text("ingest:\n  workers: 2\n  inline_below_mb: 0\n  task_mb: 2\n  flush_rows: 20000\n"
                      "  shard_input_mb: 7\n  light_workers_below_mb: 0\n")  # both runs stage parquet in the workers
    env = {**os.environ, "CHRONORISK_PSEUDONYM_KEY": KEY}
    done = subprocess.run([sys.executable, "-m", "chronorisk.cli", "--params", str(params), "--work", str(work),
                           "ingest", "--input", str(folder)], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr
    return json.loads((work / "ingested" / "ingest_report.json").read_text())


def _copies(src: Path, dest: Path, times: int) -> Path:
    dest.mkdir()
    for k in range(times):
        for path in sorted(src.glob("*.json.gz")):
            (dest / f"c{k:02d}_{path.name}").symlink_to(path)
    return dest


@pytest.mark.slow
def test_peak_memory_is_flat_in_the_number_of_files(synthea_dir, tmp_path):
    times = max(3, round(8 * slow_scale()))
    small = _ingest(_copies(synthea_dir, tmp_path / "x1", 1), tmp_path / "w1")
    large = _ingest(_copies(synthea_dir, tmp_path / f"x{times}", times), tmp_path / "wn")
    assert large["totals"]["read"] == times * small["totals"]["read"]
    # workers hold one bundle and at most flush_rows rows; the parent counts and holds one bucket
    assert large["memory"]["worker_peak_rss_mb"] < small["memory"]["worker_peak_rss_mb"] * 1.25 + 15
    assert large["memory"]["parent_peak_rss_mb"] < small["memory"]["parent_peak_rss_mb"] * 1.25 + 15
