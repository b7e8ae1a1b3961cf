"""`chronorisk train`: one LightGBM model per task, saved, logged to MLflow and registered.

Reads the feature tables of `chronorisk features` (or, with `--meds DIR
[--labels DIR] --task NAME`, MEDS data and labels from elsewhere, features
computed on the fly), trains on the train split with the tuning split for
early stopping and calibration, saves the bundle to `<work>/models/<task>/`,
logs the run (parameters, tuning-split metrics, feature spec) and registers
the bundle as a new version of `chronorisk-<task>` with alias `challenger`.
`champion` moves only through `chronorisk promote`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from chronorisk.features.labels_cli import LABELS_HELP


def add_data_arguments(parser: argparse.ArgumentParser, *, meds_help: str) -> None:
    """The rows to work on: tasks, and feature tables or MEDS data with labels (train and evaluate)."""
    parser.add_argument("--task", action="append", default=None, metavar="NAME",
                        help="task name or task YAML file (repeatable; default: params.yaml labels.tasks)")
    parser.add_argument("--features", type=Path, default=None, metavar="DIR",
                        help="feature tables root (default: <work>/features)")
    parser.add_argument("--meds", type=Path, default=None, metavar="DIR", help=meds_help)
    parser.add_argument("--labels", type=Path, default=None, metavar="PATH",
                        help="with --meds: " + LABELS_HELP + "; default: extract with the task")


def check_labels_argument(args: argparse.Namespace, tasks: list[str]) -> None:
    """`--labels` goes with `--meds`, exists, and names labels of every task (train, evaluate, promote)."""
    from chronorisk.errors import InputError
    from chronorisk.features.labels import check_labels_for_tasks, label_files
    from chronorisk.features.tasks import load_task

    if args.labels is None:
        return
    if args.meds is None:
        raise InputError("--labels", "needs --meds (labels from elsewhere go with their MEDS data)")
    names = [load_task(t).name for t in tasks]
    check_labels_for_tasks(args.labels, names)
    for name in names:
        label_files(args.labels, name)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_data_arguments(parser, meds_help="MEDS data from elsewhere: compute features on the fly instead of --features")
    parser.add_argument("--tracking-uri", default=None, metavar="URI",
                        help="MLflow tracking server or database (default: sqlite in the work folder)")
    parser.add_argument("--experiment", default=None, help="MLflow experiment (default: params.yaml train.experiment)")
    parser.add_argument("--tune", action=argparse.BooleanOptionalAction, default=None,
                        help="random search of LightGBM parameters first (default: params.yaml train.tune)")
    parser.add_argument("--no-mlflow", action="store_true",
                        help="save the bundles only: no MLflow run, no registration")
    parser.add_argument("--allow-unfit", action="store_true",
                        help="keep (and register) a model that fails the checks (fewer cases than train.min_cases, "
                             "tuning AUROC interval including 0.5); its model card opens with 'not fit for use'")


def run(args: argparse.Namespace, ctx) -> int:
    from chronorisk.errors import InputError

    params = ctx.params
    tasks = list(args.task or params.labels.tasks)
    for flag, path in (("--meds", args.meds), ("--features", args.features)):
        if path is not None and not path.exists():
            raise InputError(flag, f"{path} does not exist")
    check_labels_argument(args, tasks)
    update = {"tune": args.tune} if args.tune is not None else {}
    if args.allow_unfit:
        update["allow_unfit"] = True
    train_config = params.train.model_copy(update=update)
    tracking = None
    if not args.no_mlflow:
        from chronorisk.training.tracking import configure_tracking, resolve_tracking_uri

        tracking = configure_tracking(
            ctx.paths,
            uri=resolve_tracking_uri(ctx.paths, args.tracking_uri, params.train.tracking_uri),
            experiment=args.experiment or train_config.experiment,
        )
    for task in tasks:
        _train_one(task, args, ctx, train_config, tracking)
    return 0


def _train_one(task: str, args, ctx, train_config, tracking) -> None:
    from chronorisk.training import train as tr

    params = ctx.params
    if args.meds is not None:
        data = tr.compute_task_data(args.meds, task, params.features, labels=args.labels)
    else:
        data = tr.load_feature_tables(args.features or ctx.paths.features, task)
    name = data.task.name
    from chronorisk.features.pruning import dropped_lines

    for line in dropped_lines(data.spec):  # what the feature fit dropped, clipped or left out, and why
        print(f"{name}: {line}")
    bundle_dir = Path(ctx.paths.models) / name
    if tracking is None:
        result = tr.train_task(data, params.model, train_config)
        result.bundle.save(bundle_dir)
        _print(name, result, bundle_dir, None)
        return
    from chronorisk.training import registry
    from chronorisk.training.tracking import log_files, log_metrics, log_params, redact, start_run

    tags = {"task": name, "stage": "train", "source": "meds" if args.meds is not None else "features"}
    with start_run(tracking, name=f"train-{name}", tags=tags) as run:
        log_params({"model": params.model.model_dump(mode="json"), "train": train_config.model_dump(mode="json"),
                    "features": params.features.model_dump(mode="json"), "task": name})
        version = _next_version(tracking, name)
        mlflow_meta = {"mlflow": {
            "run_id": run.info.run_id, "experiment": tracking.experiment_name,
            "tracking_uri": redact(tracking.uri), "registered_model": registry.registered_name(name),
        }}
        result = tr.train_task(data, params.model, train_config, version=version, extra_metadata=mlflow_meta)
        result.bundle.save(bundle_dir)
        log_metrics({"tuning": result.tuning_metrics})
        log_metrics({k: v for k, v in result.training_info.items() if isinstance(v, int | float)}, prefix="data.")
        log_metrics({"n_trees": result.bundle.metadata.get("n_trees"),
                     "best_iteration": result.bundle.metadata.get("best_iteration")})
        for i, trial in enumerate(getattr(result.model, "tuning_trials_", []) or []):
            log_metrics({"tuning_trial": trial}, step=i)
        log_files([(bundle_dir / "spec.json", "feature_spec"), (bundle_dir / "task.yaml", "task"),
                   (bundle_dir / "bundle.json", "bundle")])
        reg = registry.register_bundle(
            tracking, bundle_dir, task=name, alias=registry.CHALLENGER,
            booster=result.bundle.booster if result.bundle.kind == "lightgbm" else None,
            tags={"chronorisk.data_fingerprint": result.bundle.metadata.get("data_fingerprint"),
                  "chronorisk.source": tags["source"]},
            description=f"trained on {result.training_info['n_train']} rows of {data.source}",
        )
    if str(reg.version) != str(version):
        import logging

        logging.getLogger(__name__).warning(
            "%s: registered as version %s while the bundle says %s (another training ran at the same time)",
            reg.name, reg.version, version,
        )
    _print(name, result, bundle_dir, reg)


def _next_version(tracking, task: str) -> int:
    from chronorisk.training.registry import list_versions

    versions = [v.version for v in list_versions(tracking, task)]
    return max(versions, default=0) + 1


def _print(task: str, result, bundle_dir: Path, reg) -> None:
    info, m = result.training_info, result.tuning_metrics
    selection = result.bundle.metadata.get("model_selection") or {}
    losses = ", ".join(f"{k} {v:.4f}" for k, v in (selection.get("cv_log_loss") or {}).items())
    what = (f"{result.bundle.metadata.get('n_trees')} trees" if result.bundle.kind == "lightgbm"
            else f"logistic regression (C={result.model.params_.get('C')})")
    line = (f"{task}: {info['n_train']:,} train rows ({info['n_train_positive']:,} outcomes), "
            f"{info['n_valid']:,} tuning rows; {what}"
            + (f" chosen by cross-validated log loss ({losses})" if len(selection.get("cv_log_loss") or {}) > 1 else "")
            + ", "
            f"{result.bundle.calibrator.method} calibration; tuning AUROC {m['auroc']:.3f}, ECE {m['ece']:.3f}")
    print(line)
    for reason in result.bundle.metadata.get("unfit") or []:
        print(f"  NOT FIT FOR USE (kept with --allow-unfit): {reason}")
    print(f"  bundle -> {bundle_dir}")
    if reg is not None:
        print(f"  registered {reg.name} version {reg.version} (alias challenger)")
