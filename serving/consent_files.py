"""Consent changes reach the MEDS data: every site dataset's withdrawn list is rewritten from the store.

After each withdrawal or renewal (API or `chronorisk access`), each site of the MEDS root gets the
subjects whose withdrawal is in effect there (`data/consent.py`), so the next `features`, `train`,
`evaluate` or federated run leaves them out (their feature caches change with the file).
"""

from __future__ import annotations

from pathlib import Path


def sync_withdrawn(store, meds_root: Path | None) -> dict[str, int]:
    """Write each site's withdrawn list under `meds_root`; {site: subjects withdrawn} ({} without a root)."""
    from chronorisk.data.consent import write_site_withdrawn
    from chronorisk.data.meds_io import site_ids, site_root

    if meds_root is None or not Path(meds_root).is_dir():
        return {}
    return {site: write_site_withdrawn(site_root(meds_root, site), store.withdrawn_subjects(site=site))
            for site in site_ids(meds_root)}
