"""Promotion: move the `champion` alias only to a version that is not worse, on the same data.

The champion is what serving loads, so promotion is a deliberate, checked
step: the candidate (a version number, or the `challenger`) and the current
champion are both scored now on the same held-out rows, and the candidate
wins unless its AUROC falls below the champion's by more than
`promote.auroc_tolerance`, its ECE rises above the champion's by more than
`promote.ece_tolerance`, or its Brier score rises above the champion's by
more than `promote.brier_tolerance`. AUROC sees only the ranking and ECE
only ten binned averages; the Brier score is a proper scoring rule (it is
lowest for the true risks), so it also catches a candidate that is a little
worse on both at once, or miscalibrated within the bins. Figures logged at
training time are not compared: they may come from other data. The first
promotion (no champion yet) succeeds on the candidate's own figures.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from chronorisk.errors import ChronoriskError

if TYPE_CHECKING:
    import polars as pl

    from chronorisk.models.bundle import ModelBundle
    from chronorisk.paths import WorkPaths
    from chronorisk.training.config import PromoteConfig
    from chronorisk.training.tracking import Tracking

REFUSED_EXIT = 3  # the candidate is worse: distinct from user errors (2) and bugs (1)


@dataclass(frozen=True)
class Figures:
    """One version's figures on the promotion data."""

    version: int
    n: int
    n_positive: int
    auroc: float
    ece: float
    brier: float


@dataclass(frozen=True)
class Decision:
    task: str
    candidate: Figures
    champion: Figures | None
    accepted: bool
    reasons: tuple[str, ...]
    auroc_tolerance: float
    ece_tolerance: float
    brier_tolerance: float

    def to_dict(self) -> dict:
        return {
            "task": self.task,
            "accepted": self.accepted,
            "reasons": list(self.reasons),
            "candidate": asdict(self.candidate),
            "champion": asdict(self.champion) if self.champion else None,
            "auroc_tolerance": self.auroc_tolerance,
            "ece_tolerance": self.ece_tolerance,
            "brier_tolerance": self.brier_tolerance,
        }


def decide(task: str, candidate: Figures, champion: Figures | None, config: PromoteConfig) -> Decision:
    """Accept unless the candidate is worse beyond tolerance (pure: figures in, decision out)."""
    reasons: list[str] = []
    if not math.isfinite(candidate.auroc) or not math.isfinite(candidate.ece):
        reasons.append(
            f"the candidate's figures are undefined on the evaluation data (n={candidate.n}, "
            f"positives={candidate.n_positive}): AUROC needs both outcomes"
        )
    elif champion is not None and champion.version != candidate.version:
        if math.isfinite(champion.auroc) and candidate.auroc < champion.auroc - config.auroc_tolerance:
            reasons.append(
                f"AUROC {candidate.auroc:.4f} is below the champion's {champion.auroc:.4f} "
                f"by {champion.auroc - candidate.auroc:.4f} (tolerance {config.auroc_tolerance})"
            )
        if math.isfinite(champion.ece) and candidate.ece > champion.ece + config.ece_tolerance:
            reasons.append(
                f"ECE {candidate.ece:.4f} is above the champion's {champion.ece:.4f} "
                f"by {candidate.ece - champion.ece:.4f} (tolerance {config.ece_tolerance})"
            )
        if math.isfinite(champion.brier) and candidate.brier > champion.brier + config.brier_tolerance:
            reasons.append(
                f"Brier {candidate.brier:.4f} is above the champion's {champion.brier:.4f} "
                f"by {candidate.brier - champion.brier:.4f} (tolerance {config.brier_tolerance})"
            )
    accepted = not reasons
    if accepted:
        if champion is None:
            reasons.append("no champion yet")
        elif champion.version == candidate.version:
            reasons.append(f"version {candidate.version} is already the champion")
        else:
            reasons.append("not worse than the champion within tolerance")
    return Decision(
        task, candidate, champion, accepted, tuple(reasons),
        config.auroc_tolerance, config.ece_tolerance, config.brier_tolerance,
    )


def render(decision: Decision) -> str:
    """Both sets of figures side by side, then the verdict and its reasons."""
    rows = [("", "candidate", "champion")]
    cand, champ = decision.candidate, decision.champion
    rows.append(("version", str(cand.version), str(champ.version) if champ else "-"))
    for label, attr, fmt in (
        ("n", "n", "{:d}"),
        ("positives", "n_positive", "{:d}"),
        ("AUROC", "auroc", "{:.4f}"),
        ("ECE", "ece", "{:.4f}"),
        ("Brier", "brier", "{:.4f}"),
    ):
        rows.append((label, fmt.format(getattr(cand, attr)), fmt.format(getattr(champ, attr)) if champ else "-"))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"promotion of chronorisk-{decision.task}: candidate vs champion on the same held-out rows"]
    lines += ["  " + "  ".join(cell.rjust(width[i]) for i, cell in enumerate(r)) for r in rows]
    verdict = "PROMOTED to champion" if decision.accepted else "REFUSED"
    lines.append(f"{verdict}: " + "; ".join(decision.reasons))
    return "\n".join(lines)


def figures(version: int, y_true: np.ndarray, risk: np.ndarray) -> Figures:
    """AUROC, ECE and Brier of one version's risks (the same functions `evaluate` uses)."""
    from chronorisk.training import metrics

    y = np.asarray(y_true, dtype=bool)
    p = np.asarray(risk, dtype=float)
    n_pos = int(y.sum())
    auroc = float(metrics.auroc(y, p)) if 0 < n_pos < len(y) else float("nan")
    return Figures(
        version=version,
        n=len(y),
        n_positive=n_pos,
        auroc=auroc,
        ece=float(metrics.ece(y, p)) if len(y) else float("nan"),
        brier=float(np.mean((p - y) ** 2)) if len(y) else float("nan"),
    )


def write_record(paths: WorkPaths, decision: Decision) -> Path:
    """`<work>/reports/promotion_<task>.json`: the last decision and its figures."""
    from chronorisk.data.files import write_text_atomic

    path = Path(paths.reports) / f"promotion_{decision.task}.json"
    record = {**decision.to_dict(), "decided_at": datetime.now(UTC).isoformat(timespec="seconds")}
    write_text_atomic(path, json.dumps(record, indent=2))
    return path


def apply(tracking: Tracking, decision: Decision) -> None:
    """Move `champion` when accepted; tag the candidate version with the outcome either way."""
    from chronorisk.training.registry import CHAMPION, registered_name, set_alias

    client = tracking.client()
    name, version = registered_name(decision.task), str(decision.candidate.version)
    status = "accepted" if decision.accepted else "refused"
    client.set_model_version_tag(name, version, "chronorisk.promotion", status)
    client.set_model_version_tag(name, version, "chronorisk.promotion_reasons", "; ".join(decision.reasons)[:5000])
    for key in ("auroc", "ece", "brier", "n"):
        value = str(getattr(decision.candidate, key))
        client.set_model_version_tag(name, version, f"chronorisk.promotion_{key}", value)
    if decision.accepted:
        set_alias(tracking, decision.task, CHAMPION, decision.candidate.version)


def held_out_rows(data, bundle: ModelBundle, meds_root: Path | None) -> pl.DataFrame:
    """The held-out rows of `data` with features as `bundle` computes them (same rows for every bundle)."""
    from chronorisk.training.train import HELD_OUT, with_spec

    return with_spec(data.only(HELD_OUT), bundle.spec, meds_root).frame


def score(version: int, bundle: ModelBundle, rows: pl.DataFrame) -> Figures:
    return figures(version, rows["boolean_value"].to_numpy(), bundle.predict_risk(rows))


def promote_task(
    tracking: Tracking,
    paths: WorkPaths,
    task: str,
    data,
    config: PromoteConfig,
    *,
    version: int | None = None,
    meds_root: Path | None = None,
) -> Decision:
    """Score the candidate (version N, else the challenger) and the champion on the same held-out rows;
    move `champion` when the candidate is not worse; record the decision either way."""
    from chronorisk.models.bundle import ModelBundle
    from chronorisk.training.registry import (
        CHALLENGER,
        CHAMPION,
        bundle_cache,
        download_bundle,
        get_version_by_alias,
        resolve,
    )

    candidate = resolve(tracking, task, alias=CHALLENGER, version=version)
    champion = get_version_by_alias(tracking, task, CHAMPION)
    cache = bundle_cache(paths)
    cand_bundle = ModelBundle.load(download_bundle(tracking, candidate, cache))
    cand_rows = held_out_rows(data, cand_bundle, meds_root)
    if cand_rows.height == 0:
        raise ChronoriskError(f"task {task}: no held-out rows to compare the models on")
    cand_figures = score(candidate.version, cand_bundle, cand_rows)
    champ_figures = None
    if champion is not None:
        if champion.version == candidate.version:
            champ_figures = cand_figures
        else:
            champ_bundle = ModelBundle.load(download_bundle(tracking, champion, cache))
            champ_figures = score(champion.version, champ_bundle, held_out_rows(data, champ_bundle, meds_root))
    decision = decide(task, cand_figures, champ_figures, config)
    apply(tracking, decision)
    write_record(paths, decision)
    return decision
