"""`chronorisk demo`: the whole chain on the embedded defaults, stage by stage.

Each stage runs through the same CLI entry point a user would call, so the
demo exercises exactly what `dvc repro` and the docs describe; it stops at the
first stage that fails and says which.
"""

from __future__ import annotations

import argparse
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--patients", type=int, default=None, help="cohort size (default: params generate.patients)")
    parser.add_argument("--no-serve", action="store_true", help="stop after scoring and monitoring")
    parser.add_argument("--skip-federated", action="store_true", help="skip the federated training stage")


def demo_stages(args: argparse.Namespace, ctx) -> list[tuple[str, list[str]]]:
    """The chain as (title, argv) pairs; argv are ordinary `chronorisk` subcommands."""
    params = ctx.params
    patients = str(args.patients or params.generate.patients)
    score_date = f"{params.generate.end.year}-07-01"
    stages = [
        ("generate", ["generate", "--patients", patients, "--fhir", "--devices", "0.5"]),
        ("ingest", ["ingest", "--demo", str(ctx.paths.fhir)]),
        ("summary", ["summary"]),
        ("summary (ingested)", ["summary", "--meds", str(ctx.paths.ingested)]),
        ("features", ["features"]),
        ("train", ["train"]),
        ("evaluate", ["evaluate"]),
        ("promote", ["promote", "--all", "--demo"]),
    ]
    if not args.skip_federated:
        stages.append(("federated", ["federated", "sim"]))
    stages += [
        ("score", ["score", "--date", score_date, "--demo"]),
        ("home devices", ["devices", "--demo", "demo", "--minutes", "3"]),
        ("monitor", ["monitor"]),
    ]
    if not args.no_serve:
        stages.append(("serve", ["serve", "--demo"]))
    return stages


def run(args: argparse.Namespace, ctx) -> int:
    from chronorisk.cli import main
    from chronorisk.errors import ChronoriskError

    common = ["--work", str(ctx.paths.root)]
    if ctx.params_path is not None:
        common += ["--params", str(ctx.params_path)]
    for title, argv in demo_stages(args, ctx):
        print(f"\n== {title}: chronorisk {' '.join(argv)}", flush=True)
        started = time.perf_counter()
        code = main([*common, *argv])
        if code != 0:
            raise ChronoriskError(f"demo stopped: stage '{title}' failed (exit {code})")
        print(f"== {title} done in {time.perf_counter() - started:.1f} s", flush=True)
    return 0
