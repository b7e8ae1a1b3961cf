"""`chronorisk ingest`: FHIR R4 bundles / bulk-export NDJSON -> one MEDS dataset per site.

Needs a pseudonymization key (env var `CHRONORISK_PSEUDONYM_KEY`, or
`--secret-file`); `--demo` creates one under the work folder for demo data.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

_SITE = re.compile(r"^[A-Za-z0-9_.-]+$")
PARAMS_SECTION = "ingest"  # the one section of params.yaml this command reads (the CLI validates it alone)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input_path", nargs="?", type=Path, default=None, metavar="INPUT",
                        help="folder of bundles / NDJSON files, or one file (default: <work>/fhir)")
    parser.add_argument("--input", type=Path, default=None, help="same as INPUT")
    parser.add_argument("--out", type=Path, default=None, help="output MEDS root (default: <work>/ingested)")
    parser.add_argument("--site", default=None,
                        help="put every patient at this site (default: from the encounters' service provider)")
    parser.add_argument("--secret-file", type=Path, default=None,
                        help="file holding the pseudonymization key (else $CHRONORISK_PSEUDONYM_KEY)")
    parser.add_argument("--demo", action="store_true",
                        help="demo data only: create/use <work>/secrets/pseudonym.key when no key is given")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: params.yaml)")


def run(args: argparse.Namespace, ctx) -> int:
    from chronorisk.data.fhir.ingest import IngestOptions, ingest
    from chronorisk.data.fhir.report import format_report
    from chronorisk.data.pseudonym import load_key
    from chronorisk.errors import InputError

    config = ctx.params.ingest
    if args.input is not None and args.input_path is not None and args.input != args.input_path:
        raise InputError("--input", f"given twice ({args.input_path} and {args.input}); give one")
    if args.site is not None and not _SITE.match(args.site):
        raise InputError("--site", f"{args.site!r} is not a site id; use letters, digits, '_', '-', '.'")
    if args.workers is not None and args.workers < 1:
        raise InputError("--workers", f"{args.workers} is not a positive number")
    secret_file = args.secret_file or (Path(config.secret_file) if config.secret_file else None)
    key, key_source = load_key(secret_file=secret_file, env_var=config.secret_env, demo=args.demo,
                               secrets_dir=ctx.paths.secrets)
    options = IngestOptions(
        input=args.input or args.input_path or ctx.paths.fhir,
        out=args.out or ctx.paths.ingested,
        quarantine_root=None,  # beside --out
        site=args.site,
        workers=args.workers,
    )
    report = ingest(options, config, key, key_source)
    print(format_report(report))
    return 0
