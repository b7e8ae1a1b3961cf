"""Model promotions in the audit log: what the registry's champions are, and each move of one recorded.

Promotion itself lives in training (`training/promote.py` moves the MLflow alias `champion`), which may
not import serving. So the layer that may import both records it: `chronorisk promote` (serving's
`promote_cli`) reads every task's champion before and after training's promotion and appends one
`model_promote` entry per move (from which version to which, with the version's run and source).
`chronorisk audit verify` reads the registry's champions now (`registry_view`) and replays those
entries against them (`serving/audit.py`, `StateReplay.compare_registry`).
"""

from __future__ import annotations

from pathlib import Path

from chronorisk.serving.audit import PROMOTED_ALIAS, RegistryView

_STAGES_SET = ("Staging", "Production")


def champion_of(client, name: str, version: str) -> dict:
    """{version, run_id, source} of one registered version: what an entry records and verify compares."""
    mv = client.get_model_version(name, version)
    return {"version": int(mv.version), "run_id": mv.run_id, "source": mv.source}


def read_registry(tracking) -> RegistryView:
    """Every `chronorisk-<task>` registered model: its champion and any version set to an MLflow stage."""
    from chronorisk.training.registry import MODEL_PREFIX
    from chronorisk.training.tracking import redact

    client = tracking.client()
    champions: dict[str, dict | None] = {}
    staged: list[tuple[str, int, str]] = []
    token = None
    while True:
        page = client.search_registered_models(filter_string=f"name LIKE '{MODEL_PREFIX}%'", max_results=100,
                                               page_token=token)
        for model in page:
            task = model.name.removeprefix(MODEL_PREFIX)
            version = (model.aliases or {}).get(PROMOTED_ALIAS)
            champions[task] = champion_of(client, model.name, str(version)) if version is not None else None
            staged += [(task, int(mv.version), mv.current_stage) for mv in model.latest_versions or ()
                       if mv.current_stage in _STAGES_SET]
        token = page.token
        if not token:
            break
    return RegistryView(where=redact(tracking.uri), champions=champions, staged=tuple(sorted(staged)))


def registry_view(ctx, tracking_uri: str | None) -> RegistryView:
    """The registry `chronorisk promote` writes to (`--tracking-uri`, `train.tracking_uri`, else the work
    folder's), read for `audit verify`. An embedded registry that was never created holds no champion."""
    from chronorisk.training.tracking import connect, redact, resolve_tracking_uri

    uri = resolve_tracking_uri(ctx.paths, tracking_uri, ctx.params.train.tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return RegistryView(where=redact(uri))
    return read_registry(connect(uri))


def champions_now(tracking_uri: str, tasks: list[str]) -> dict[str, dict | None]:
    """Each task's champion ({version, run_id, source}, or None), read without creating a registry."""
    from chronorisk.errors import ChronoriskError
    from chronorisk.training.tracking import connect

    try:
        tracking = connect(tracking_uri)
    except ChronoriskError:  # no registry yet: no champion
        return dict.fromkeys(tasks)
    view = read_registry(tracking)
    return {task: view.champions.get(task) for task in tasks}


def record_moves(audit, before: dict[str, dict | None], after: dict[str, dict | None], actor: str) -> list[str]:
    """One audit entry per task whose champion changed; returns those tasks."""
    moved = []
    for task in sorted(after):
        old, new = before.get(task), after[task]
        if old == new:
            continue
        audit.record_promotion(task=task, from_version=old["version"] if old else None, to=new, actor=actor)
        moved.append(task)
    return moved
