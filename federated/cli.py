"""`chronorisk federated`: sim | up | run | down | status | compare.

- `sim`: the whole federation in one process (development, tests);
- `up`: SuperLink + one SuperNode per site as separate processes on
  loopback, TLS and SuperNode authentication, supervised;
- `run`: train on the running federation with `flwr run`;
- `down`: stop everything `up` started;
- `status`: what `up` started and whether it is alive;
- `compare`: centralized vs federated (each strategy) vs site-local models
  on the same held-out patients, JSON + HTML in `<work>/reports/`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from chronorisk.features.labels_cli import LABELS_HELP

_LABELS_HELP = "supplied labels, " + LABELS_HELP + "; each site keeps its own subjects' rows"


def _checked_labels(args, tasks: list[str] | None, ctx) -> Path | None:
    """`--labels` resolved to an absolute path (sites may run elsewhere), checked against the tasks."""
    from chronorisk.errors import InputError
    from chronorisk.features.labels import check_labels_for_tasks, label_files
    from chronorisk.features.tasks import load_task

    if getattr(args, "labels", None) is None:
        return None
    if not args.labels.exists():
        raise InputError("--labels", f"{args.labels} does not exist")
    names = [load_task(t).name for t in (tasks or ctx.params.labels.tasks)]
    check_labels_for_tasks(args.labels, names)
    for name in names:
        label_files(args.labels, name)  # fails here, with the reason, not later at every site
    return args.labels.resolve()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="federated_command", metavar="ACTION", required=True)

    def training_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--strategy", choices=("bagging", "cyclic"), default=None,
                       help="federated strategy (default: params.yaml federated.strategy)")
        p.add_argument("--rounds", type=int, default=None, help="rounds (default: params.yaml)")

    sim = sub.add_parser("sim", help="simulate the federation in one process")
    training_options(sim)
    sim.add_argument("--meds", type=Path, default=None, help="MEDS root with sites/<site>/ (default: <work>/meds)")
    sim.add_argument("--sites", nargs="+", default=None, help="only these sites")
    sim.add_argument("--tasks", nargs="+", default=None, help="only these tasks (default: params.yaml labels.tasks)")
    sim.add_argument("--no-register", action="store_true", help="do not register the models in MLflow")
    sim.add_argument("--labels", type=Path, default=None, help=_LABELS_HELP)

    up = sub.add_parser("up", help="start SuperLink and one SuperNode per site (TLS, node authentication)")
    up.add_argument("--meds", type=Path, default=None, help="MEDS root with sites/<site>/ (default: <work>/meds)")
    up.add_argument("--sites", nargs="+", default=None, help="only these sites")
    up.add_argument("--port", type=int, default=None, help="SuperLink port (default: params.yaml; 0 = any free)")
    up.add_argument("--labels", type=Path, default=None,
                    help=_LABELS_HELP + "; written into every SuperNode's node config (labels=...): a real site "
                    "names its own in its own node config")

    run = sub.add_parser("run", help="train on the federation started by `up`")
    training_options(run)
    run.add_argument("--timeout", type=float, default=1800.0, help="give up after this many seconds")

    sub.add_parser("down", help="stop what `up` started")
    sub.add_parser("status", help="show what `up` started")

    compare = sub.add_parser("compare", help="centralized vs federated vs site-local, per site")
    compare.add_argument("--meds", type=Path, default=None, help="MEDS root (default: <work>/meds)")
    compare.add_argument("--strategies", nargs="+", choices=("bagging", "cyclic"), default=None,
                         help="federated strategies to compare (default: both)")
    compare.add_argument("--tasks", nargs="+", default=None, help="only these tasks")
    compare.add_argument("--labels", type=Path, default=None, help=_LABELS_HELP)


def run(args: argparse.Namespace, ctx) -> int:
    action = args.federated_command
    if action == "sim":
        return _sim(args, ctx)
    if action == "up":
        return _up(args, ctx)
    if action == "run":
        return _run(args, ctx)
    if action == "down":
        return _down(ctx)
    if action == "status":
        return _status(ctx)
    if action == "compare":
        return _compare(args, ctx)
    raise AssertionError(action)


def _print_table(summary: dict) -> None:
    print(f"strategy {summary['strategy']}: {len(summary['sites'])} sites, {summary['wall_s']:.1f} s")
    for task, info in summary["tasks"].items():
        print(f"\n{task}: {info['num_trees']} trees, calibration {info['calibration'].get('method')}")
        print(f"  {'site':<18}{'n':>8}{'AUROC':>8}{'slope':>8}{'ECE':>8}")
        rows = [*info["sites"].items(), ("all", info["overall"])]
        for site, m in rows:
            print(f"  {site:<18}{int(m.get('n', 0)):>8}{m.get('auroc', float('nan')):>8.3f}"
                  f"{m.get('calibration_slope', float('nan')):>8.2f}{m.get('ece', float('nan')):>8.3f}")
    for event in summary.get("events", []):
        print(f"event: {event}", file=sys.stderr)


def _sim(args, ctx) -> int:
    from chronorisk.federated.simulation import run_simulation

    summary = run_simulation(
        ctx.params, ctx.paths, meds_root=args.meds, sites=args.sites, strategy=args.strategy,
        rounds=args.rounds, tasks=args.tasks, register=False if args.no_register else None,
        labels=_checked_labels(args, args.tasks, ctx),
    )
    _print_table(summary)
    return 0


def _layout(ctx):
    from chronorisk.federated.deploy import Layout

    return Layout(Path(ctx.paths.root).resolve())


def _up(args, ctx) -> int:
    from chronorisk.data.meds_io import site_ids
    from chronorisk.federated.deploy import up

    meds = (args.meds or ctx.paths.meds).resolve()
    sites = args.sites or site_ids(meds)
    cfg = ctx.params.federated
    state = up(_layout(ctx), sites, meds,
               superlink_port=cfg.superlink_port if args.port is None else args.port,
               task_poll_interval_s=cfg.task_poll_interval_s, wait_s=cfg.up_timeout_s,
               labels=_checked_labels(args, None, ctx))
    print(f"SuperLink on 127.0.0.1:{state['superlink']['port']} (TLS, SuperNode authentication)")
    for site, info in state["sites"].items():
        print(f"  SuperNode {site:<18} pid {info['pid']}")
    print(f"state: {_layout(ctx).state}; stop with `chronorisk federated down`")
    return 0


def _run(args, ctx) -> int:
    from chronorisk.federated.deploy import submit_run

    result = submit_run(_layout(ctx), params_path=ctx.params_path, strategy=args.strategy,
                        rounds=args.rounds, timeout_s=args.timeout)
    _print_table(result)
    print(f"\nrun {result['tag']} in {result['submit_wall_s']:.1f} s; bundles: "
          + ", ".join(result.get("bundles", {}).values()))
    return 0


def _down(ctx) -> int:
    from chronorisk.federated.deploy import down

    stopped = down(_layout(ctx))
    print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


def _status(ctx) -> int:
    from chronorisk.federated.deploy import status

    print(json.dumps(status(_layout(ctx)), indent=1))
    return 0


def _compare(args, ctx) -> int:
    from chronorisk.federated.compare import run_compare

    report = run_compare(ctx.params, ctx.paths, meds_root=args.meds, strategies=args.strategies,
                         tasks=args.tasks, labels=_checked_labels(args, args.tasks, ctx))
    for task, info in report["tasks"].items():
        print(f"\n{task} (held-out AUROC / calibration slope)")
        models = list(info["overall"])
        print(f"  {'site':<18}" + "".join(f"{m:>20}" for m in models))
        for site in [*info["sites"], "all"]:
            cells = info["overall"] if site == "all" else info["sites"][site]
            print(f"  {site:<18}" + "".join(_cell(cells.get(m)) for m in models))
    print(f"\nreport: {report['html']}")
    return 0


def _cell(values: dict | None) -> str:
    if not values or "auroc" not in values:
        return f"{'-':>20}"
    return f"{values['auroc']:>12.3f} / {values['calibration_slope']:>5.2f}"
