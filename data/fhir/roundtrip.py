"""Round-trip check: do two MEDS roots hold the same events, site by site?

Used to check that ingesting the generator's FHIR bundles gives back the
generator's own MEDS output. Subject ids differ by design (ingestion replaces
source ids by a keyed hash), so subjects are compared by what they hold:
per site, the same codes with the same counts, the same times, the same text
values, the same numeric values after unit normalization (to a relative
tolerance: values travel through the site's unit and back), and the same
multiset of per-subject event counts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from chronorisk.data.meds_io import scan_site, site_ids


def compare_roots(expected: Path, actual: Path, rtol: float = 1e-5) -> dict:
    """Differences between two MEDS roots (empty lists = identical); plus sizes and the worst value error."""
    problems: list[str] = []
    sites_e, sites_a = site_ids(expected), site_ids(actual)
    if sites_e != sites_a:
        problems.append(f"sites differ: expected {sites_e}, got {sites_a}")
    worst = 0.0
    events = 0
    for site in sorted(set(sites_e) & set(sites_a)):
        e = scan_site(expected, site).collect()
        a = scan_site(actual, site).collect()
        events += e.height
        counts_e = dict(e.group_by("code").len().iter_rows())
        counts_a = dict(a.group_by("code").len().iter_rows())
        if counts_e != counts_a:
            diff = {c: (counts_e.get(c, 0), counts_a.get(c, 0)) for c in set(counts_e) | set(counts_a)
                    if counts_e.get(c, 0) != counts_a.get(c, 0)}
            problems.append(f"{site}: event counts per code differ (expected, got): {dict(sorted(diff.items()))}")
            continue
        for code in sorted(counts_e):
            ce = e.filter(pl.col("code") == code)
            ca = a.filter(pl.col("code") == code)
            if ce.get_column("time").sort().to_list() != ca.get_column("time").sort().to_list():
                problems.append(f"{site} {code}: times differ")
            if ce.get_column("text_value").sort().to_list() != ca.get_column("text_value").sort().to_list():
                problems.append(f"{site} {code}: text values differ")
            ve = ce.get_column("numeric_value")
            va = ca.get_column("numeric_value")
            if ve.null_count() != va.null_count():
                problems.append(f"{site} {code}: {ve.null_count()} vs {va.null_count()} null values")
                continue
            xe = np.sort(ve.drop_nulls().to_numpy().astype(np.float64))
            xa = np.sort(va.drop_nulls().to_numpy().astype(np.float64))
            if xe.size:
                rel = np.abs(xe - xa) / np.maximum(np.abs(xe), 1e-9)
                worst = max(worst, float(rel.max()))
                if not np.allclose(xa, xe, rtol=rtol, atol=1e-6):
                    problems.append(f"{site} {code}: values differ (max relative difference {rel.max():.2e})")
        per_subject_e = e.group_by("subject_id").len().get_column("len").sort().to_list()
        per_subject_a = a.group_by("subject_id").len().get_column("len").sort().to_list()
        if per_subject_e != per_subject_a:
            problems.append(f"{site}: events per subject differ")
    return {"sites": sites_e, "events": events, "max_relative_value_difference": worst, "problems": problems}
