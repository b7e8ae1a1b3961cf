"""The `chronorisk` command: one subcommand per pipeline stage.

Each subcommand lives in its package as a module exposing
`add_arguments(parser)` (argparse only, cheap to import) and
`run(args, ctx) -> int` (imports the heavy libraries it needs); a module
that reads one section of params.yaml only may say so (`PARAMS_SECTION`):
its `ctx.params` then holds that section alone, validated alone. The entry
point parses params.yaml once, sets the health-data environment, and turns
errors into one clear line and a non-zero exit: never a traceback.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from chronorisk.errors import ChronoriskError

# subcommand -> (module, help)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("chronorisk.data.synth.cli", "generate the synthetic multi-site cohort (MEDS, FHIR)"),
    "ingest": ("chronorisk.data.fhir.cli", "convert FHIR R4 bundles / NDJSON to MEDS per site"),
    "summary": ("chronorisk.features.summary", "print a per-site summary of a MEDS root"),
    "labels": ("chronorisk.features.labels_cli", "extract task labels (MEDS label parquet)"),
    "features": ("chronorisk.features.cli", "fit the feature spec and compute feature tables"),
    "train": ("chronorisk.training.train_cli", "train one LightGBM model per task, log to MLflow"),
    "evaluate": ("chronorisk.training.evaluate_cli", "evaluate models: metrics, report, model card"),
    # training's promotion, wrapped by serving so that each champion move is an audit entry
    "promote": ("chronorisk.serving.promote_cli", "promote a registered model to champion, if not worse (audited)"),
    "federated": ("chronorisk.federated.cli", "federated training with Flower (sim, up, run, down, compare)"),
    "score": ("chronorisk.serving.score_cli", "batch-score every eligible patient into the score store"),
    "serve": ("chronorisk.serving.serve_cli", "serve the risk API and pages with BentoML"),
    "cohort": ("chronorisk.serving.cohort_cli", "query and export a high-risk cohort"),
    "access": ("chronorisk.serving.access_cli", "manage API keys and consent withdrawal (admin)"),
    "monitor": ("chronorisk.serving.monitor_cli", "drift and performance monitoring with Evidently"),
    "audit": ("chronorisk.serving.audit_cli", "verify the hash-chained audit log"),
    "devices": ("chronorisk.devices.cli", "home devices: register, list, revoke (admin), replay readings, export"),
    "stream": ("chronorisk.devices.stream_cli", "consume home-device readings over MQTT, re-score, alert"),
    "demo": ("chronorisk.demo", "run the whole chain on the embedded defaults"),
}


@dataclass(frozen=True)
class Context:
    """What every subcommand gets: parsed params and the work folder."""

    params: object  # chronorisk.config.Params
    paths: object  # chronorisk.paths.WorkPaths
    params_path: Path | None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chronorisk", description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=None, help="params.yaml (default: project root)")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: $CHRONORISK_WORK or ./work)")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and module.startswith(exc.name):
                p.set_defaults(_missing=module)
                continue
            raise
        mod.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def _context(args: argparse.Namespace) -> Context:
    from chronorisk.environment import configure_environment
    from chronorisk.params_file import SectionParams, load_section
    from chronorisk.paths import WorkPaths, default_work_dir, project_root

    params_path = args.params if args.params is not None else project_root() / "params.yaml"
    if args.params is not None and not args.params.is_file():
        raise ChronoriskError(f"--params: file {args.params} does not exist")
    work = (args.work.resolve() if args.work else default_work_dir())
    work.mkdir(parents=True, exist_ok=True)
    configure_environment(work)
    section = getattr(sys.modules.get(args._module), "PARAMS_SECTION", None)
    if section is None:
        from chronorisk.config import load_params  # (every section's model)

        params = load_params(params_path)
    else:
        params = SectionParams(section, load_section(params_path, section))
    return Context(params=params, paths=WorkPaths(work), params_path=params_path)


def main(argv: list[str] | None = None) -> int:
    code = _run_command(argv)
    if argv is None:  # the process's own command line: it exits next
        # Exiting, the interpreter collects garbage while it tears the modules down, traversing every object
        # polars, pyarrow, pydantic... created (~0.1-0.2 s after `chronorisk ingest`); frozen objects are
        # skipped (they are still freed). Not when called in-process with arguments (tests): that process goes on.
        gc.freeze()
    return code


def _run_command(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("urllib3", "alembic", "matplotlib", "numba", "asyncio", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if getattr(args, "_missing", None):
        print(f"chronorisk {args.command}: not available in this build ({args._missing})", file=sys.stderr)
        return 2
    try:
        ctx = _context(args)
        return int(importlib.import_module(args._module).run(args, ctx) or 0)
    except ChronoriskError as exc:
        print(f"chronorisk {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"chronorisk {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: say where, not what (messages may carry data values)
        if os.environ.get("CHRONORISK_DEBUG") == "1":
            raise
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = f"{Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno}" if tb else "?"
        print(
            f"chronorisk {args.command}: internal error {type(exc).__name__} at {where}; "
            "rerun with CHRONORISK_DEBUG=1 for the traceback",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
