"""Consent changes reach the files: the MEDS withdrawn lists and the monitoring log.

After each withdrawal or renewal (API or `chronorisk access`), each site of the MEDS root gets the
subjects whose withdrawal is in effect there (`data/consent.py`), so the next `features`, `train`,
`evaluate` or federated run leaves them out (their feature caches change with the file).

After a withdrawal the monitoring log (`serving/prediction_log.py`, under the work folder) loses every
row and delayed outcome of the patients whose withdrawal is in effect at the row's site (a row logged at
site `unknown`: withdrawn anywhere), audited as one `monitoring_purge` entry; `chronorisk monitor` runs
the same purge before it reads, for withdrawals that took effect later or rows a worker had still
buffered.
"""

from __future__ import annotations

from pathlib import Path

UNKNOWN_SITE = "unknown"  # the site the monitoring log writes for a request that named none


def sync_withdrawn(store, meds_root: Path | None) -> dict[str, int]:
    """Write each site's withdrawn list under `meds_root`; {site: subjects withdrawn} ({} without a root)."""
    from chronorisk.data.consent import write_site_withdrawn
    from chronorisk.data.meds_io import site_ids, site_root

    if meds_root is None or not Path(meds_root).is_dir():
        return {}
    return {site: write_site_withdrawn(site_root(meds_root, site), store.withdrawn_subjects(site=site))
            for site in site_ids(meds_root)}


def purge_monitoring(store, work: Path, audit, *, actor: str, role: str, subject_id: int | None = None):
    """Remove the withdrawn patients' rows from the work folder's monitoring log; audit what was removed
    (counts only) when anything was and `audit` is given. Returns `prediction_log.Purged`."""
    from chronorisk.serving.prediction_log import PredictionLog, Purged

    plog = PredictionLog.for_work(work)
    if not plog.tasks():
        return Purged()
    purged = plog.purge_subjects(
        lambda site: store.withdrawn_subjects(site=None if site == UNKNOWN_SITE else site))
    if audit is not None and (purged.rows or purged.outcomes):
        audit.append(actor=actor, role=role, action="monitoring_purge", subject_id=subject_id,
                     detail={"rows": purged.rows, "parts": purged.parts, "outcomes": purged.outcomes})
    return purged
