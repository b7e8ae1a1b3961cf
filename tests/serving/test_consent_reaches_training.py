"""A consent withdrawal reaches the data: every training path leaves the patient out from the next run.

The store writes each MEDS site's withdrawn list (`serving/consent_files.py`, `data/consent.py`);
`features.sources.SiteSource` (labels, features, train, evaluate, summary) and the federated sites read it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from datetime import timedelta

import polars as pl
from serving_support import REPO, SITES, seed_store, subject_id

from chronorisk.data.consent import read_site_withdrawn, write_site_withdrawn
from chronorisk.data.meds_io import site_root
from chronorisk.features.sources import find_sites
from chronorisk.serving.consent_files import sync_withdrawn
from chronorisk.serving.store import utcnow


def _copy(meds, tmp_path):
    root = tmp_path / "meds"
    shutil.copytree(meds, root)
    return root


def _subjects(frame: pl.LazyFrame | pl.DataFrame) -> set[int]:
    frame = frame.collect() if isinstance(frame, pl.LazyFrame) else frame
    return set(frame["subject_id"].unique().to_list())


def test_a_withdrawn_patient_is_left_out_of_every_training_path(tiny_world, tmp_path):
    from chronorisk.federated.site import SiteContext
    from chronorisk.training.train import read_meds

    root = _copy(tiny_world.meds, tmp_path)
    source = find_sites(root)[0]
    everyone = _subjects(source.scan())
    gone = sorted(everyone)[:3]
    assert write_site_withdrawn(source.root, gone) == 3
    assert read_site_withdrawn(source.root)["subject_id"].to_list() == gone

    assert _subjects(source.scan()) == everyone - set(gone)
    assert not set(gone) & _subjects(source.splits())
    events, splits = read_meds(root)
    assert not set(gone) & _subjects(events) and not set(gone) & _subjects(splits)
    site = SiteContext(site=source.site, meds_root=root, cache_dir=tmp_path / "cache")
    assert _subjects(site.events()) == everyone - set(gone)

    # through the real CLI: the summary counts the site's patients without them
    def summary_line() -> str:
        out = subprocess.run([sys.executable, "-m", "chronorisk.cli", "--work", str(tmp_path / "w"), "summary",
                              "--meds", str(root)], capture_output=True, text=True, cwd=REPO, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return next(line for line in out.stdout.splitlines() if source.site in line)

    with_three_out = summary_line()
    write_site_withdrawn(source.root, [])
    assert summary_line() != with_three_out


def test_the_store_writes_each_sites_withdrawn_list(sqlite_store, tmp_path):
    seed_store(sqlite_store)
    root = tmp_path / "meds"
    for site in SITES:
        (site_root(root, site) / "data").mkdir(parents=True)
    now = utcnow()
    one, everywhere = subject_id(0, 1), subject_id(1, 2)
    sqlite_store.withdraw_consent(one, site=SITES[0], at=now - timedelta(hours=1))
    sqlite_store.withdraw_consent(everywhere, site=None, at=now - timedelta(hours=1))
    counts = sync_withdrawn(sqlite_store, root)
    assert set(counts) == set(SITES)
    first = read_site_withdrawn(site_root(root, SITES[0]))["subject_id"].to_list()
    assert first == sorted([one, everywhere])
    assert read_site_withdrawn(site_root(root, SITES[2]))["subject_id"].to_list() == [everywhere]
    sqlite_store.renew_consent(one, site=SITES[0], at=now)
    sync_withdrawn(sqlite_store, root)
    assert read_site_withdrawn(site_root(root, SITES[0]))["subject_id"].to_list() == [everywhere]
    assert sync_withdrawn(sqlite_store, None) == {}
