"""`chronorisk generate`: the synthetic multi-site cohort (MEDS, ground truth, optional FHIR)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: params.yaml)")
    parser.add_argument("--patients", type=int, default=None, help="number of patients (default: params.yaml)")
    parser.add_argument("--out", type=Path, default=None, help="output root (default: the work folder)")
    parser.add_argument("--ideal", action="store_true", default=None,
                        help="no missingness, no measurement noise, no hidden risk terms")
    parser.add_argument("--fhir", action="store_true", default=None, help="also write FHIR R4 bundles")
    parser.add_argument("--realistic-codes", action="store_true", default=None,
                        help="messy records as real ones: a long tail of codes, a local lab code, smoking as text, "
                             "ICD-9 at one site, an unmapped lab carrying risk (data/synth/messy.py)")
    parser.add_argument("--drift", action="append", default=None, metavar="SPEC",
                        help="site=<id>,from=YYYY-MM-DD,kind=units|population|lab_bias (repeatable)")
    parser.add_argument("--new-site", action="store_true", default=False,
                        help="add a new region's site unlike the others, joining late (data/synth/new_site.py)")
    parser.add_argument("--chunk-size", type=int, default=None, help="patients per chunk (default: params.yaml)")
    parser.add_argument("--workers", type=int, default=None, help="parallel processes (default: params.yaml)")
    parser.add_argument("--devices", type=float, default=None, metavar="SHARE",
                        help="give this share (0-1) of diagnosed patients home devices and simulate their readings")


def resolve_config(args: argparse.Namespace, base):
    """params.yaml's `generate` section overridden by the command line, validated as a whole."""
    from pydantic import ValidationError

    from chronorisk.data.config import GenerateConfig
    from chronorisk.data.synth.drift import parse_drift
    from chronorisk.errors import InputError

    values = base.model_dump(by_alias=True)
    for arg, key in (("seed", "seed"), ("patients", "patients"), ("ideal", "ideal"), ("fhir", "fhir"),
                     ("realistic_codes", "realistic_codes"),
                     ("chunk_size", "chunk_size"), ("workers", "workers")):
        if getattr(args, arg) is not None:
            values[key] = getattr(args, arg)
    if getattr(args, "new_site", False):
        from chronorisk.data.synth.new_site import with_new_site

        values["sites"] = with_new_site(values["sites"])
    if args.drift:
        site_ids = [s["site_id"] for s in values["sites"]]
        drift = [parse_drift(text) for text in args.drift]
        for d in drift:
            if d.site not in site_ids:
                raise InputError("--drift", f"unknown site {d.site!r}; sites: {', '.join(site_ids)}")
            if not values["start"] < d.start <= values["end"]:
                raise InputError("--drift", f"date {d.start} must fall after {values['start']} and by {values['end']}")
        values["drift"] = [d.model_dump(by_alias=True) for d in drift]
    try:
        return GenerateConfig.model_validate(values)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "generate"
        flag = {"patients": "--patients", "seed": "--seed", "chunk_size": "--chunk-size",
                "workers": "--workers"}.get(where, where)
        raise InputError(flag, err["msg"].removeprefix("Value error, ")) from None


def run(args: argparse.Namespace, ctx) -> int:
    from chronorisk.data.synth.runner import generate

    cfg = resolve_config(args, ctx.params.generate)
    if args.devices is not None and not 0 <= args.devices <= 1:
        from chronorisk.errors import InputError

        raise InputError("--devices", f"{args.devices:g} is not a share between 0 and 1")
    out = (args.out or ctx.paths.root).resolve()
    summary = generate(cfg, out)
    mode = ("ideal" if cfg.ideal else "realistic") + (", realistic codes" if cfg.realistic_codes else "")
    print(f"generated {summary.patients:,} patients ({mode}, seed {cfg.seed}) in {summary.seconds:.1f} s "
          f"with {summary.workers} worker(s) -> {out}")
    width = max(len(s) for s in summary.patients_by_site)
    for site, n in summary.patients_by_site.items():
        print(f"  {site:<{width}}  {n:>9,} patients  {summary.events_by_site[site]:>12,} events")
    print(f"  {'total':<{width}}  {summary.patients:>9,} patients  {summary.events:>12,} events, "
          f"{summary.deaths:,} deaths")
    print("  truth rows: " + ", ".join(f"{t} {n:,}" for t, n in summary.truth_rows.items()))
    if cfg.fhir:
        print(f"  FHIR bundles: {summary.bundles:,}")
    if args.devices is not None:
        _devices(args.devices, cfg, out)
    if cfg.drift:
        print("  drift: " + "; ".join(f"{d.site} {d.kind} from {d.start}" for d in cfg.drift))
    return 0


def _devices(share: float, cfg, out: Path) -> None:
    from chronorisk.data.synth.devices import write_devices

    n_devices, n_readings = write_devices(out, share, cfg.seed, cfg.end)
    print(f"  home devices: {n_devices:,} with {n_readings:,} readings -> {out / 'devices'}")
