"""`chronorisk evaluate`: held-out, temporal and leave-one-site-out evaluation of each task's model.

Evaluates the bundle `chronorisk train` saved (`<work>/models/<task>/`), or a
registered version (`--version N` / `--alias NAME`), on the held-out split of
the feature tables (or of `--meds DIR [--labels DIR]`, features computed with
the model's own spec). Writes per task:

- `<work>/reports/evaluation_<task>.json`: every record (holdout, temporal,
  leave-one-site-out), notes and the SHAP summary;
- `<work>/reports/evaluation_<task>.html`: the report with plots;
- `<work>/reports/model_card_<task>.md`: the model card;
- `<work>/metrics/<task>.json`: headline numbers (DVC metrics);

logs them to the model's training run in MLflow, and prints the headline
table per task and site.

`--new-site SITE` evaluates a site that joined late instead
(`training/new_site_evaluation.py`): the global model's figures there
before local labels, the label-free estimate beside the realized figures
per window, and the site recalibration after `--cases` local cases; written
to `<work>/reports/new_site_<site>_<task>.json` and printed.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from chronorisk.training.train_cli import add_data_arguments

    add_data_arguments(parser, meds_help="MEDS data from elsewhere: features computed on the fly with the model's spec")
    parser.add_argument("--models", type=Path, default=None, metavar="DIR",
                        help="bundle folders <DIR>/<task>/ (default: <work>/models)")
    parser.add_argument("--version", type=int, default=None, help="evaluate this registered version instead")
    parser.add_argument("--alias", default=None, help="evaluate the registered version with this alias instead")
    parser.add_argument("--truth", type=Path, default=None, metavar="DIR",
                        help="generator ground truth (default: <work>/truth; used when its rows match the data)")
    parser.add_argument("--bootstrap", type=int, default=None, help="bootstrap resamples (default: params.yaml)")
    parser.add_argument("--no-temporal", action="store_true", help="skip temporal validation")
    parser.add_argument("--no-leave-one-site-out", action="store_true", help="skip leave-one-site-out validation")
    parser.add_argument("--tracking-uri", default=None, metavar="URI",
                        help="MLflow tracking server or database (default: sqlite in the work folder)")
    parser.add_argument("--no-mlflow", action="store_true", help="write the files only, log nothing to MLflow")
    new = parser.add_argument_group("a site that joined late (--new-site)")
    new.add_argument("--new-site", default=None, metavar="SITE",
                     help="evaluate the model at this site before and after its first local labels")
    new.add_argument("--since", default=None, metavar="YYYY-MM-DD",
                     help="the site's rows from this prediction time on (default: the generator's join date for "
                          "its new site, else all the site's rows)")
    new.add_argument("--cases", default="25,50,100", metavar="N,N,...",
                     help="recalibrate after this many local cases (default: 25,50,100)")
    new.add_argument("--repeats", type=int, default=5, help="random orders of the local cases (default: 5)")


def run(args: argparse.Namespace, ctx) -> int:
    from chronorisk.errors import InputError
    from chronorisk.training.train_cli import check_labels_argument

    params = ctx.params
    tasks = list(args.task or params.labels.tasks)
    if args.bootstrap is not None and args.bootstrap < 0:
        raise InputError("--bootstrap", f"must be 0 or more, got {args.bootstrap}")
    for flag, path in (("--meds", args.meds), ("--features", args.features), ("--models", args.models)):
        if path is not None and not path.exists():
            raise InputError(flag, f"{path} does not exist")
    check_labels_argument(args, tasks)
    if args.new_site is not None:
        return _run_new_site(args, ctx, tasks)
    update: dict = {}
    if args.bootstrap is not None:
        update["bootstrap"] = args.bootstrap
    if args.no_temporal:
        update["temporal_split"] = None
    if args.no_leave_one_site_out:
        update["leave_one_site_out"] = False
    config = params.evaluate.model_copy(update=update)
    tracking = None
    registry_wanted = args.version is not None or args.alias is not None
    if not args.no_mlflow or registry_wanted:
        from chronorisk.training.tracking import configure_tracking, resolve_tracking_uri

        tracking = configure_tracking(
            ctx.paths, uri=resolve_tracking_uri(ctx.paths, args.tracking_uri, params.train.tracking_uri),
            experiment=params.train.experiment,
        )
    tables = []
    for task in tasks:
        tables.append(_evaluate_one(task, args, ctx, config, tracking, log_to_mlflow=not args.no_mlflow))
    print()
    print("\n\n".join(tables))
    return 0


def _evaluate_one(task: str, args, ctx, config, tracking, *, log_to_mlflow: bool) -> str:
    from chronorisk.features.tasks import load_task
    from chronorisk.training import evaluate_task as ev
    from chronorisk.training import train as tr
    from chronorisk.training.evaluation import headline_table

    params = ctx.params
    name = load_task(task).name
    bundle, registered = _bundle(name, args, ctx, tracking)
    if args.meds is not None:
        data = tr.compute_task_data(args.meds, task, params.features, labels=args.labels, spec=bundle.spec)
    else:
        data = tr.load_feature_tables(args.features or ctx.paths.features, task)
        data = tr.with_spec(data, bundle.spec, data.meds_root or _default_meds(ctx))
    truth_dir = args.truth or ctx.paths.truth
    result = ev.evaluate_all(data, bundle, _model_config(params.model, bundle), config, truth_dir=truth_dir)
    files = _write_outputs(ctx.paths, bundle, data, result)
    if log_to_mlflow and tracking is not None:
        _log(tracking, bundle, registered, result, files)
    for note in result.notes:
        print(f"{name}: {note}")
    print(f"{name}: report {files['html']}, model card {files['card']}")
    return headline_table(result.records, groups=("all", "site"))


def _run_new_site(args, ctx, tasks: list[str]) -> int:
    """`--new-site SITE`: each task's bundle at the site from `--since` on (training/new_site_evaluation.py)."""
    import json
    from datetime import date, datetime

    import polars as pl

    from chronorisk.data.files import write_text_atomic
    from chronorisk.data.synth.new_site import JOINS, NEW_SITE_ID
    from chronorisk.errors import InputError
    from chronorisk.features.tasks import load_task
    from chronorisk.training import train as tr
    from chronorisk.training.new_site_evaluation import evaluate_new_site, new_site_table

    try:
        cases = sorted({int(c) for c in str(args.cases).split(",") if c.strip()})
    except ValueError:
        raise InputError("--cases", f"must be whole numbers separated by commas, got {args.cases!r}") from None
    if not cases or min(cases) < 5:
        raise InputError("--cases", f"each count must be 5 or more, got {args.cases!r}")
    if args.repeats < 1:
        raise InputError("--repeats", f"must be 1 or more, got {args.repeats}")
    since = None
    if args.since is not None:
        try:
            since = date.fromisoformat(args.since)
        except ValueError:
            raise InputError("--since", f"must be a date YYYY-MM-DD, got {args.since!r}") from None
    elif args.new_site == NEW_SITE_ID:
        since = JOINS
    tracking = None
    if args.version is not None or args.alias is not None:  # a registered version: the registry is needed
        from chronorisk.training.tracking import configure_tracking, resolve_tracking_uri

        tracking = configure_tracking(
            ctx.paths, uri=resolve_tracking_uri(ctx.paths, args.tracking_uri, ctx.params.train.tracking_uri),
            experiment=ctx.params.train.experiment,
        )
    for task in tasks:
        name = load_task(task).name
        bundle, _ = _bundle(name, args, ctx, tracking)
        if args.meds is not None:
            data = tr.compute_task_data(args.meds, task, ctx.params.features, labels=args.labels, spec=bundle.spec)
        else:
            data = tr.load_feature_tables(args.features or ctx.paths.features, task)
            data = tr.with_spec(data, bundle.spec, data.meds_root or _default_meds(ctx))
        sites = sorted(data.frame["site"].unique().to_list())
        if args.new_site not in sites:
            raise InputError("--new-site", f"no rows of site {args.new_site!r}; the data's sites are "
                                           f"{', '.join(sites)}")
        rows = data.frame.filter(pl.col("site") == args.new_site)
        if since is not None:
            rows = rows.filter(pl.col("prediction_time") >= datetime.combine(since, datetime.min.time()))
        if rows.height == 0:
            raise InputError("--since", f"site {args.new_site} has no rows from {since} on")
        start = since.isoformat() if since is not None else str(rows["prediction_time"].min())[:10]
        risk = bundle.predict_risk(rows.drop("site"))  # the global calibration: no site layer yet
        result = evaluate_new_site(rows, risk, site=args.new_site, since=start, cases=cases, repeats=args.repeats,
                                   seed=0)
        training = bundle.metadata.get("training") or {}
        last_trained = str(training.get("last_prediction_time", ""))[:10]
        if args.new_site in (training.get("sites") or []) and last_trained >= start:
            result.notes.append(f"the model was trained on rows of {args.new_site} from {start} on: its figures "
                                f"there are optimistic (train without them for a fair picture)")
        out = Path(ctx.paths.reports) / f"new_site_{args.new_site}_{name}.json"
        write_text_atomic(out, json.dumps({"task": name, **result.to_dict()}, indent=1, default=str))
        print(f"{name}: {new_site_table(result)}")
        print(f"{name}: written {out}")
    return 0


def _default_meds(ctx) -> Path | None:
    meds = Path(ctx.paths.meds)
    return meds if meds.exists() else None


def _bundle(task: str, args, ctx, tracking):
    """The local bundle (default) or a registered version (--version / --alias)."""
    from chronorisk.models.bundle import ModelBundle

    if args.version is not None or args.alias is not None:
        from chronorisk.training.registry import fetch_bundle

        folder, registered = fetch_bundle(task, args.alias, version=args.version, paths=ctx.paths, tracking=tracking)
        return ModelBundle.load(folder), registered
    folder = Path(args.models or ctx.paths.models) / task
    if not folder.is_dir():
        from chronorisk.errors import InputError

        raise InputError("--models", f"no model bundle at {folder}; run `chronorisk train` first")
    return ModelBundle.load(folder), None


def _model_config(model_config, bundle):
    """params.yaml's model section with the bundle's own LightGBM parameters (tuned ones included)."""
    tuned = {k: v for k, v in (bundle.metadata.get("lightgbm_params") or {}).items() if k != "metric"}
    return model_config.model_copy(update={"lightgbm": {**model_config.lightgbm, **tuned}})


def _write_outputs(paths, bundle, data, result) -> dict[str, Path]:
    import json

    from chronorisk.data.files import write_text_atomic
    from chronorisk.models.model_card import render_model_card
    from chronorisk.training.evaluate_task import metrics_summary
    from chronorisk.training.report import TaskReport, write_report

    task = result.task
    reports, metrics_dir = Path(paths.reports), Path(paths.metrics)
    files = {
        "json": reports / f"evaluation_{task}.json",
        "html": reports / f"evaluation_{task}.html",
        "card": reports / f"model_card_{task}.md",
        "metrics": metrics_dir / f"{task}.json",
    }
    model = {k: bundle.metadata.get(k) for k in ("name", "version", "trained_at", "data_fingerprint", "model_kind",
                                                  "n_trees", "calibration_method")}
    document = {
        "task": task,
        "mode": result.mode,
        "source": data.source,
        "model": model,
        "records": result.records,
        "notes": result.notes,
        "baseline": result.baseline,
        "shap_importance": dict(list(result.importance.items())[:30]),
    }
    write_text_atomic(files["json"], json.dumps(document, indent=1, default=str))
    frame = result.frame
    report = TaskReport(
        task=task,
        records=result.records,
        y=frame["y"].to_numpy() if frame is not None else [],
        risk=frame["risk"].to_numpy() if frame is not None else [],
        site=frame["site"].to_numpy() if frame is not None else None,
        true_risk=frame["true_risk"].to_numpy() if frame is not None and "true_risk" in frame.columns else None,
        importance=result.importance,
        metadata=bundle.metadata,
        notes=list(result.notes),
    )
    write_report(files["html"], [report], title=f"chronorisk evaluation: {task}")
    card = render_model_card(bundle.metadata, result.holdout, task=bundle.task, importance=result.importance,
                             limitations=_card_notes(result), baseline=result.baseline)
    write_text_atomic(files["card"], card)
    write_text_atomic(files["metrics"], json.dumps(metrics_summary(result), indent=1, sort_keys=True))
    return files


def _card_notes(result) -> list[str]:
    """Temporal and leave-one-site-out figures, as model card limitations in plain words."""
    out = []
    t = next((r for r in result.temporal if r.get("group") == "all"), None)
    if t and t.get("auroc") is not None:
        out.append(f"Temporal validation (refitted on earlier outcomes, tested on later held-out rows): "
                   f"AUROC {t['auroc']:.3f}, ECE {t['ece']:.3f} on {t['n']} rows.")
    for r in result.leave_one_site_out:
        if r.get("auroc") is not None:
            out.append(f"Trained without site {r['site']} and tested on it: AUROC {r['auroc']:.3f}, "
                       f"calibration slope {_num(r.get('calibration_slope'))}, ECE {_num(r.get('ece'))}.")
    return out


def _num(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _log(tracking, bundle, registered, result, files: dict[str, Path]) -> None:
    """Into the model's training run when this backend has it, else a run of its own."""
    from chronorisk.training.evaluate_task import metrics_summary
    from chronorisk.training.tracking import log_files, log_metrics, start_run

    run_id = registered.run_id if registered is not None else (bundle.metadata.get("mlflow") or {}).get("run_id")
    if run_id is not None:
        try:
            tracking.client().get_run(run_id)
        except Exception:  # a bundle trained against another backend
            run_id = None
    name = f"evaluate-{result.task}"
    tags = {"task": result.task, "stage": "evaluate"}
    with start_run(tracking, name=name, tags=None if run_id else tags, run_id=run_id):
        log_metrics(metrics_summary(result), prefix="eval.")
        log_files([(files["html"], "evaluation"), (files["card"], "evaluation"), (files["json"], "evaluation"),
                   (files["metrics"], "evaluation")])
