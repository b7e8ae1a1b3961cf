"""Consent changes reach the files: the MEDS withdrawn lists and the monitoring log.

After each withdrawal or renewal (API or `chronorisk access`), each site of the MEDS root gets the
subjects whose withdrawal is in effect there (`data/consent.py`), so the next `features`, `train`,
`evaluate` or federated run leaves them out (their feature caches change with the file).

After a withdrawal the monitoring log (`serving/prediction_log.py`, under the work folder) loses every
row and delayed outcome of the patients whose withdrawal is in effect at the row's site (a row logged at
site `unknown`: withdrawn anywhere), audited as one `monitoring_purge` entry; `chronorisk monitor` runs
the same purge (a sweep) before it reads, for withdrawals that took effect later or rows a worker had
still buffered.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from chronorisk.data.files import write_text_atomic

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
    """Remove withdrawn patients' rows from the work folder's monitoring log (only `subject_id`'s when
    given: the withdrawal just recorded); audit what was removed (counts only) when anything was and
    `audit` is given. Returns `prediction_log.Purged`.

    A sweep (no `subject_id`) remembers in `<monitoring>/consent_purge.json` a digest of the withdrawals it
    applied, when it started and the parts it rewrote; the next sweep under the same withdrawals reads only
    the parts written since (minus a margin) other than those, any change of withdrawals reads them all."""
    from chronorisk.serving.prediction_log import PredictionLog, Purged
    from chronorisk.serving.store import ConsentHistory, utcnow

    plog = PredictionLog.for_work(work)
    if not plog.tasks():
        return Purged()
    now = utcnow()
    with store.engine.connect() as conn:
        histories = ConsentHistory.all(conn)
    if subject_id is not None:
        histories = {sid: h for sid, h in histories.items() if sid == subject_id}

    def subjects_at(site: str) -> set[int]:
        scope = None if site == UNKNOWN_SITE else site
        return {sid for sid, h in histories.items() if h.withdrawn_at(scope, now) is not None}

    marker = plog.root / PURGE_MARKER
    state = _withdrawals_digest(histories, now)
    clean = _clean_parts(marker, state, plog.root) if subject_id is None else None
    started = time.time()
    purged = plog.purge_subjects(subjects_at, already_clean=clean)
    if subject_id is None:
        rewritten = {str(p.relative_to(plog.root)): p.stat().st_mtime_ns for p in purged.rewritten if p.is_file()}
        write_text_atomic(marker, json.dumps({"state": state, "at": started, "rewritten": rewritten}))
    if audit is not None and (purged.rows or purged.outcomes):
        audit.append(actor=actor, role=role, action="monitoring_purge", subject_id=subject_id,
                     detail={"rows": purged.rows, "parts": purged.parts, "outcomes": purged.outcomes})
    return purged


PURGE_MARKER = "consent_purge.json"
MTIME_MARGIN_SECONDS = 5.0  # file times are the machine's clock: a part written as a sweep started is read again


def _clean_parts(marker: Path, state: str, root: Path):
    """The predicate of parts the last sweep left clean under the same withdrawals (None: read every part)."""
    try:
        prior = json.loads(marker.read_text()) if marker.is_file() else {}
        if prior.get("state") != state:
            return None
        since, rewritten = float(prior["at"]) - MTIME_MARGIN_SECONDS, dict(prior.get("rewritten") or {})
    except (ValueError, KeyError, TypeError, AttributeError):
        return None

    def clean(path: Path) -> bool:
        stat = path.stat()
        return stat.st_mtime < since or rewritten.get(str(path.relative_to(root))) == stat.st_mtime_ns

    return clean


def _withdrawals_digest(histories: dict, now) -> str:
    """SHA-256 of the (subject, site or every site) withdrawals in effect: no id leaves in the marker."""
    effective = sorted(
        (sid, scope or "*") for sid, h in histories.items()
        for scope in {s for s, _ in h.withdrawals} | {None} if h.withdrawn_at(scope, now) is not None
    )
    return hashlib.sha256(json.dumps(effective).encode()).hexdigest()
