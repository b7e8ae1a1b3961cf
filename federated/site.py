"""What a site does with each message, on its own records only.

Every function takes the site's context (its name, its MEDS dataset, its
cache folder: from the SuperNode's `--node-config`) and a request Payload,
and returns the reply Payload. Nothing here knows about Flower.

- `summarize`: code counts of the training subjects (subjects per code, via
  `features.pipeline.code_summary`), quantile sketches of numeric codes, the
  subject count, the first and last event date. Counts below `min_count`
  are withheld.
- `train`: build (or load from the cache) the site's feature table for the
  agreed spec, then boost `k` trees on the training split starting from the
  global model (its raw score is the init score), and reply with the new
  trees only, the training-row count (the site's weight) and tuning metrics.
- `evaluate`: score the tuning and held-out splits with the final global
  model and reply with binned statistics (calibration.py), never rows.

Feature tables are computed once per (task, spec, prediction times, data
version) and kept as parquet in `<cache>/<task>/<key>.parquet` on the
SuperNode's side, so a message costs a parquet read, not a feature
computation. The table keeps no subject or time column.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from chronorisk.errors import InputError
from chronorisk.federated.calibration import MIN_CELL_ROWS, BinnedScores
from chronorisk.federated.protocol import EVALUATE, SUMMARY, TRAIN, Payload, ProtocolError

log = logging.getLogger("chronorisk.federated.site")

TRAIN_SPLIT, TUNING_SPLIT, HELD_OUT_SPLIT = "train", "tuning", "held_out"
SKETCH_POINTS = 101
_MEMO: dict[str, SiteTable] = {}
_MEMO_MAX = 8


@dataclass(frozen=True)
class SiteContext:
    """One site: its name, its MEDS root (holding `sites/<site>/`) and its cache folder."""

    site: str
    meds_root: Path
    cache_dir: Path
    threads: int = 1
    labels: Path | None = None  # the site's supplied labels (`--labels` semantics: features.labels.label_files)

    @classmethod
    def from_node_config(cls, config: Mapping[str, object]) -> SiteContext:
        """From a SuperNode's node config: `site`, `meds`, `cache` (optional `threads`, `labels`)."""
        missing = [k for k in ("site", "meds", "cache") if not config.get(k)]
        if missing:
            raise InputError("node-config", f"missing {', '.join(missing)} (start the SuperNode with "
                             "--node-config 'site=\"...\" meds=\"...\" cache=\"...\"')")
        return cls(
            site=str(config["site"]),
            meds_root=Path(str(config["meds"])),
            cache_dir=Path(str(config["cache"])),
            threads=int(config.get("threads", 1) or 1),
            labels=Path(str(config["labels"])) if config.get("labels") else None,
        )

    @property
    def site_dir(self) -> Path:
        return self.meds_root / "sites" / self.site

    @property
    def source(self):
        """The site as the features package sees it (`features.sources.SiteSource`: shards, splits)."""
        from chronorisk.features.sources import SiteSource

        return SiteSource(self.site, self.site_dir)

    def events(self):
        """The site's events, without patients whose consent withdrawal is in effect (`data/consent.py`)."""
        from chronorisk.data.meds_io import EVENT_SCHEMA

        if not (self.site_dir / "data").is_dir():
            raise InputError(f"site {self.site}", f"no MEDS data under {self.site_dir}")
        return self.source.scan().select(list(EVENT_SCHEMA))


@dataclass
class SiteTable:
    """A site's feature rows for one task: matrix, labels, split and calibration half."""

    X: np.ndarray
    y: np.ndarray
    split: np.ndarray
    half: np.ndarray
    feature_names: tuple[str, ...]
    raw_cache: Path | None = None  # where the raw scores of the last global models are kept (see `model_raw`)

    def rows(self, split: str, half: int | None = None) -> np.ndarray:
        mask = self.split == split
        if half is not None:
            mask &= self.half == half
        return mask


# ---- dispatch --------------------------------------------------------------------------


def handle(kind: str, request: Payload, ctx: SiteContext) -> Payload:
    """Run the site's part of one message; the reply carries the site name and handler seconds."""
    started, started_cpu = time.perf_counter(), time.process_time()
    handlers = {SUMMARY: summarize, TRAIN: train, EVALUATE: evaluate}
    if kind not in handlers:
        raise ProtocolError(f"unknown message kind {kind!r}")
    reply = handlers[kind](ctx, request)
    reply.config["site"] = ctx.site
    reply.config["seconds"] = time.perf_counter() - started
    reply.config["cpu_seconds"] = time.process_time() - started_cpu  # wall time moves with the machine's load
    return reply


# ---- summary ---------------------------------------------------------------------------


def summarize(ctx: SiteContext, request: Payload) -> Payload:
    """Code counts, numeric sketches, subject count and data span of the site: no records."""
    import polars as pl

    from chronorisk.features.build import subject_splits
    from chronorisk.features.pipeline import code_summary
    from chronorisk.features.tasks import data_span

    min_count = int(request.config.get("min_count", 1))
    events = ctx.events()
    start, end = data_span(events)
    n_subjects = events.select(pl.col("subject_id").n_unique()).collect().item()
    # the vocabulary is fitted on training subjects only, as for the centralized model
    splits = subject_splits(ctx.source.splits())
    train_ids = splits.filter(pl.col("split") == TRAIN_SPLIT).select("subject_id")
    train_events = events.join(train_ids.lazy(), on="subject_id", how="semi")
    # counts per code and per (code, text value), numbers' presence and quantiles: no records
    full = code_summary(train_events).filter(pl.col("n_subjects") >= min_count)
    summary = full.filter(pl.col("text").is_null())
    sketch_codes, sketches, sketch_n = numeric_sketches(train_events, min_count)
    return Payload(
        config={
            "n_subjects": int(n_subjects),
            "span": [start.isoformat() if start else None, end.isoformat() if end else None],
            "codes": summary["code"].to_list(),
            "summary": full.to_dict(as_series=False),
            "sketch_codes": sketch_codes,
        },
        arrays={
            "code_subjects": summary["n_subjects"].to_numpy().astype(np.int64),
            "sketches": sketches,
            "sketch_n": sketch_n,
        },
    )


def numeric_sketches(events, min_count: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Per numeric code: its values at 101 evenly spaced quantiles, and how many values there were."""
    import polars as pl

    qs = np.linspace(0, 1, SKETCH_POINTS)
    numeric = events.filter(pl.col("numeric_value").is_not_null() & pl.col("numeric_value").is_finite())
    counts = (
        numeric.group_by("code")
        .agg(pl.len().alias("n"), pl.col("subject_id").n_unique().alias("subjects"))
        .filter(pl.col("subjects") >= max(min_count, 1))
        .sort("code")
        .collect()
    )
    if counts.height == 0:
        return [], np.zeros((0, SKETCH_POINTS)), np.zeros(0)
    quant = (
        numeric.join(counts.lazy().select("code"), on="code", how="semi")
        .group_by("code")
        .agg([pl.col("numeric_value").cast(pl.Float64).quantile(float(q), "linear").alias(f"q{i}")
              for i, q in enumerate(qs)])
        .sort("code")
        .collect()
    )
    matrix = quant.select([f"q{i}" for i in range(SKETCH_POINTS)]).to_numpy().astype(np.float64)
    return quant["code"].to_list(), matrix, counts["n"].to_numpy().astype(np.float64)


def merge_sketches(sketches: list[tuple[np.ndarray, float]], points: int = SKETCH_POINTS) -> np.ndarray:
    """Quantiles of the pooled values from per-site quantile sketches (mixture of piecewise-linear CDFs)."""
    sketches = [(np.asarray(q, dtype=np.float64), float(n)) for q, n in sketches if n > 0]
    if not sketches:
        return np.full(points, np.nan)
    grid = np.unique(np.concatenate([q for q, _ in sketches]))
    total = sum(n for _, n in sketches)
    levels = np.linspace(0, 1, sketches[0][0].size)
    cdf = np.zeros_like(grid)
    for q, n in sketches:
        cdf += n * _cdf_at(q, levels, grid)
    cdf /= total
    targets = np.linspace(0, 1, points)
    cdf, idx = np.unique(cdf, return_index=True)
    return np.interp(targets, cdf, grid[idx])


def _cdf_at(quantiles: np.ndarray, levels: np.ndarray, x: np.ndarray) -> np.ndarray:
    """One site's CDF at `x`, piecewise linear through its quantiles (ties jump to their top level)."""
    values = np.unique(quantiles)
    if values.size == 1:
        return (x >= values[0]).astype(np.float64)
    top = np.array([levels[quantiles <= v].max() for v in values])
    return np.interp(x, values, top, left=0.0, right=1.0)


# ---- feature table ---------------------------------------------------------------------


def _data_version(ctx: SiteContext) -> str:
    """Names, sizes and mtimes of the site's MEDS files (and supplied labels): a cheap version of its data."""
    h = hashlib.sha256()
    for path in sorted(ctx.site_dir.rglob("*.parquet")):
        st = path.stat()
        h.update(f"{path.relative_to(ctx.site_dir)}:{st.st_size}:{st.st_mtime_ns}".encode())
    if ctx.labels is not None and ctx.labels.exists():
        for path in sorted([ctx.labels] if ctx.labels.is_file() else ctx.labels.rglob("*.parquet")):
            st = path.stat()
            h.update(f"labels:{path}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def spec_content(spec_json: str) -> str:
    """The spec without `fit_info` (which records when and from what it was fitted): what features depend on."""
    try:
        raw = json.loads(spec_json)
    except json.JSONDecodeError:
        return spec_json
    if isinstance(raw, dict):
        raw.pop("fit_info", None)
    return json.dumps(raw, sort_keys=True)


def table_key(task: str, spec_json: str, times: list[str], data_version: str) -> str:
    """Cache key of a feature table: task, spec content, prediction times and data version."""
    h = hashlib.sha256(json.dumps([task, spec_content(spec_json), sorted(times), data_version]).encode())
    return h.hexdigest()[:24]


def feature_table(ctx: SiteContext, task: str, spec_json: str, times: list[str]) -> SiteTable:
    """The site's feature rows for (task, spec, times): from the cache, or computed once and cached."""
    from chronorisk.features.tasks import load_task

    key = table_key(task, spec_json, times, _data_version(ctx))
    if key in _MEMO:
        return _MEMO[key]
    # by the task's name: `task` may be a YAML path (an absolute one would replace the whole path)
    path = ctx.cache_dir / load_task(task).name / f"{key}.parquet"
    if path.is_file():
        table = _read_table(path)
    else:
        started = time.perf_counter()
        table = _build_table(ctx, task, spec_json, times, path)
        log.info("%s: built %s features for %d rows in %.1f s", ctx.site, task, table.y.size,
                 time.perf_counter() - started)
    table.raw_cache = path.with_name(f"{key}.raw.npz")
    if len(_MEMO) >= _MEMO_MAX:
        _MEMO.pop(next(iter(_MEMO)))
    _MEMO[key] = table
    return table


def _build_table(ctx: SiteContext, task: str, spec_json: str, times: list[str], path: Path) -> SiteTable:
    import polars as pl

    from chronorisk.data.files import atomic_output
    from chronorisk.features.build import assign_splits
    from chronorisk.features.pipeline import transform
    from chronorisk.features.spec import FeatureSpec

    spec = FeatureSpec.from_json(spec_json, source=f"feature spec of {task}")
    events = ctx.events()
    index = assign_splits(site_labels(ctx, task, times), ctx.source.splits()).with_columns(
        (pl.col("subject_id").hash(seed=17) % 2).cast(pl.Int8).alias("half"),
    )
    frame = transform(spec, events, index.lazy()).collect()
    names = list(spec.feature_names)
    out = frame.select(
        pl.col("boolean_value").cast(pl.Int8).alias("label"),
        "split",
        "half",
        *[pl.col(n).cast(pl.Float32) for n in names],
    )
    with atomic_output(path) as tmp:
        out.write_parquet(tmp, compression="zstd")
    return _from_frame(out, tuple(names))


def site_labels(ctx: SiteContext, task: str, times: list[str]):
    """The site's labels: its supplied labels (node config `labels`) of its subjects, or extracted at `times`."""
    import polars as pl

    from chronorisk.features.labels import extract_labels, read_task_labels
    from chronorisk.features.tasks import load_task

    task_def = load_task(task)
    if ctx.labels is None:
        if task_def.labels_supplied:
            raise InputError(f"site {ctx.site}", f"task {task_def.name} has supplied labels: give the site's "
                             "labels (--labels, or labels=\"...\" in its node config)")
        return extract_labels(ctx.events(), task_def, [datetime.fromisoformat(t) for t in times])
    subjects = ctx.events().select(pl.col("subject_id").unique()).collect()
    return read_task_labels(ctx.labels, task_def.name).join(subjects, on="subject_id", how="semi")


def _read_table(path: Path) -> SiteTable:
    import polars as pl

    frame = pl.read_parquet(path)
    names = tuple(c for c in frame.columns if c not in ("label", "split", "half"))
    return _from_frame(frame, names)


def _from_frame(frame, names: tuple[str, ...]) -> SiteTable:
    return SiteTable(
        X=frame.select(names).to_numpy().astype(np.float32, copy=False),
        y=frame["label"].to_numpy().astype(np.float64),
        split=frame["split"].to_numpy().astype(str),
        half=frame["half"].to_numpy().astype(np.int8),
        feature_names=names,
    )


# ---- training and evaluation -------------------------------------------------------------


def _booster(text: str | None):
    import lightgbm as lgb

    return lgb.Booster(model_str=text) if text else None


def _log_loss(y: np.ndarray, raw: np.ndarray) -> float:
    """Mean binary log-loss from raw scores (log-odds), computed stably."""
    return float(np.mean(np.logaddexp(0.0, raw) - y * raw))


def auroc(y: np.ndarray, score: np.ndarray) -> float:
    """Exact AUROC (ties count one half) by ranks: for the site's own metrics."""
    y = np.asarray(y)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    s = np.asarray(score)[order]
    ranks = np.empty(y.size)
    i = 0
    while i < s.size:
        j = i
        while j + 1 < s.size and s[j + 1] == s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _site_seed(site: str) -> int:
    return int(hashlib.sha256(site.encode()).hexdigest()[:6], 16)


def train(ctx: SiteContext, request: Payload) -> Payload:
    """Boost `trees` new trees per task from the global model on the site's training rows."""
    out = Payload(config={"tasks": {}})
    feature_s = 0.0
    for task, tcfg in request.config.get("tasks", {}).items():
        t0 = time.perf_counter()
        table = feature_table(ctx, task, request.blob_text(f"spec:{task}"), list(tcfg["times"]))
        feature_s += time.perf_counter() - t0
        train_task(out, task, table, request, site=ctx.site, threads=ctx.threads)
    out.config["feature_seconds"] = feature_s
    return out


def train_task(out: Payload, task: str, table: SiteTable, request: Payload, *, site: str, threads: int) -> None:
    """One task of a train message on a ready table: checkpoint losses of the global model, new trees."""
    tcfg = request.config["tasks"][task]
    params = dict(request.config.get("params", {}))
    params.update({"num_threads": threads, "verbose": -1, "objective": "binary"})
    params["seed"] = int(params.get("seed", 0)) + _site_seed(site)
    model = request.blobs[f"model:{task}"].decode() if f"model:{task}" in request.blobs else None
    if model and tcfg.get("checkpoints"):
        losses, rows = checkpoint_losses(table, model, list(tcfg["checkpoints"]), threads=threads)
    info, trees, metrics = train_on_table(table, model, int(tcfg["trees"]), params)
    if model and tcfg.get("checkpoints"):
        out.arrays[f"{task}:ckpt_loss"] = losses
        info["ckpt_rows"] = rows
    out.config["tasks"][task] = info
    if trees is not None:
        out.blobs[f"trees:{task}"] = trees.encode()
    out.metrics.update({f"{task}.{k}": v for k, v in metrics.items()})


def train_on_table(
    table: SiteTable, model_text: str | None, trees: int, params: dict
) -> tuple[dict, str | None, dict[str, float]]:
    """(counts, new trees as model text or None, tuning metrics) of `trees` rounds from `model_text`.

    The global model's raw score on each training row is LightGBM's init
    score, so the new trees fit what the global model still gets wrong;
    the returned model holds the new trees only.
    """
    import lightgbm as lgb

    tr, tu = table.rows(TRAIN_SPLIT), table.rows(TUNING_SPLIT)
    info = {"n_train": int(tr.sum()), "n_pos": int(table.y[tr].sum()), "n_tune": int(tu.sum())}
    if info["n_train"] == 0 or info["n_pos"] in (0, info["n_train"]):
        info["n_train"] = 0  # nothing to learn from here (no rows, or a single outcome)
        return info, None, {}
    threads = int(params.get("num_threads", 1))
    raw = model_raw(table, model_text, threads=threads) if model_text else None
    data = lgb.Dataset(table.X[tr], label=table.y[tr], init_score=None if raw is None else raw[tr],
                       feature_name=list(table.feature_names), free_raw_data=True)
    booster = lgb.train(params, data, num_boost_round=trees)
    metrics: dict[str, float] = {}
    if tu.any():
        y_tu = table.y[tu]
        before = raw[tu] if raw is not None else None
        after = booster.predict(table.X[tu], raw_score=True, num_threads=threads) + (
            before if before is not None else 0.0)
        metrics["tune_logloss_local"] = _log_loss(y_tu, after)
        metrics["tune_auroc_local"] = auroc(y_tu, after)
        if before is not None:
            metrics["tune_logloss_global"] = _log_loss(y_tu, before)
            metrics["tune_auroc_global"] = auroc(y_tu, before)
    return info, booster.model_to_string(), metrics


# ---- raw scores of the global model, reused across rounds ------------------------------------

_RAW_KEEP = 3


def _prefix_digest(trees: tuple[str, ...], n: int) -> str:
    h = hashlib.sha256()
    for body in trees[:n]:
        h.update(body.encode())
        h.update(b"\0")
    return h.hexdigest()


def _read_raw(path: Path | None, rows: int) -> list[tuple[int, str, np.ndarray]]:
    if path is None or not path.is_file():
        return []
    try:
        with np.load(path) as z:
            counts, digests, raws = z["trees"], z["digests"], z["raw"]
    except (OSError, ValueError, KeyError):
        return []  # a damaged cache is only a slower message
    if raws.ndim != 2 or raws.shape[1] != rows:
        return []
    return [(int(c), str(d), raws[i]) for i, (c, d) in enumerate(zip(counts, digests, strict=True))]


def _write_raw(path: Path | None, entries: list[tuple[int, str, np.ndarray]]) -> None:
    if path is None:
        return
    from chronorisk.data.files import atomic_output

    entries = sorted(entries, key=lambda e: e[0])[-_RAW_KEEP:]
    with atomic_output(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, trees=np.array([e[0] for e in entries], dtype=np.int64),
                 digests=np.array([e[1] for e in entries]), raw=np.stack([e[2] for e in entries]))


def _best_prefix(entries, trees: tuple[str, ...], upto: int) -> tuple[int, np.ndarray | None]:
    """The longest cached prefix of `trees` with at most `upto` trees: (its tree count, its raw scores)."""
    for count, digest, raw in sorted(entries, key=lambda e: -e[0]):
        if 0 < count <= upto and count <= len(trees) and _prefix_digest(trees, count) == digest:
            return count, raw
    return 0, None


def model_raw(table: SiteTable, model_text: str, *, threads: int = 1, upto: int | None = None,
              rows: np.ndarray | None = None) -> np.ndarray:
    """Raw scores of the global model (its first `upto` trees) on the table's rows (or `rows` of them).

    Successive global models share their first trees: a round appends trees
    to the model of the round before, early stopping cuts it. The site keeps
    the raw scores of the last few models it scored next to its feature
    table (`raw_cache`, keyed by a digest of the trees) and predicts only
    the trees after the longest prefix it already scored, instead of every
    tree of a model that grows by (sites x trees per round) trees a round.
    """
    parsed = _parse_trees(model_text)
    n = len(parsed) if upto is None else min(int(upto), len(parsed))
    entries = _read_raw(table.raw_cache, table.y.size)
    start, raw = _best_prefix(entries, parsed, n)
    X = table.X if rows is None else table.X[rows]
    out = np.zeros(X.shape[0]) if raw is None else (raw.copy() if rows is None else raw[rows])
    if n > start:
        out += _booster(model_text).predict(X, raw_score=True, start_iteration=start, num_iteration=n - start,
                                            num_threads=threads)
    if rows is None and n > start and table.raw_cache is not None:
        _write_raw(table.raw_cache, [e for e in entries if e[0] != n] + [(n, _prefix_digest(parsed, n), out)])
    return out


def _parse_trees(model_text: str) -> tuple[str, ...]:
    from chronorisk.federated.strategies import parse_model

    return parse_model(model_text).trees


def evaluate(ctx: SiteContext, request: Payload) -> Payload:
    """Binned (raw score, label) statistics of the final model on tuning halves and held-out rows."""
    out = Payload(config={"tasks": {}})
    for task, tcfg in request.config.get("tasks", {}).items():
        table = feature_table(ctx, task, request.blob_text(f"spec:{task}"), list(tcfg["times"]))
        evaluate_task(out, task, table, request, threads=ctx.threads)
    return out


def evaluate_task(out: Payload, task: str, table: SiteTable, request: Payload, *, threads: int = 1) -> None:
    """One task of an evaluate message on a ready table."""
    tcfg = request.config["tasks"][task]
    model = request.blob_text(f"model:{task}")
    ckpt = None
    if tcfg.get("checkpoints"):
        ckpt = checkpoint_losses(table, model, list(tcfg["checkpoints"]), threads=threads)
    if tcfg.get("only_checkpoints"):
        arrays, info, metrics = {}, {}, {}
    else:
        min_cell_rows = max(int(request.config.get("min_cell_rows", MIN_CELL_ROWS)), 1)
        arrays, info, metrics = evaluate_table(table, model, threads=threads, min_cell_rows=min_cell_rows)
    if ckpt is not None:
        arrays["ckpt_loss"], info["ckpt_rows"] = ckpt
    out.arrays.update({f"{task}:{k}": v for k, v in arrays.items()})
    out.config["tasks"][task] = info
    out.metrics.update({f"{task}.{k}": v for k, v in metrics.items()})


def checkpoint_losses(table: SiteTable, model_text: str, checkpoints: list[int], *,
                      threads: int = 1) -> tuple[np.ndarray, int]:
    """Sum of the tuning rows' log-loss of the model cut at each checkpoint (tree count), and the row count.

    Sums, not means: the server adds them over sites to get the pooled
    tuning loss, the quantity centralized early stopping watches. Scoring
    starts from the raw scores of the longest prefix the site already scored.
    """
    tu = table.rows(TUNING_SPLIT)
    if not tu.any() or not checkpoints:
        return np.zeros(len(checkpoints)), 0
    model = _booster(model_text)
    total = model.num_trees()
    X, y = table.X[tu], table.y[tu]
    first = min(max(int(min(checkpoints)), 0), total)
    raw = model_raw(table, model_text, threads=threads, upto=first, rows=tu) if first > 0 else np.zeros(y.size)
    done = first
    sums = np.zeros(len(checkpoints))
    for i, c in enumerate(checkpoints):
        c = min(int(c), total)
        if c > done:
            raw += model.predict(X, raw_score=True, start_iteration=done, num_iteration=c - done,
                                 num_threads=threads)
            done = c
        sums[i] = _log_loss(y, raw) * y.size
    return sums, int(y.size)


def evaluate_table(table: SiteTable, model_text: str, *, threads: int = 1,
                   min_cell_rows: int = MIN_CELL_ROWS) -> tuple[dict[str, np.ndarray], dict, dict[str, float]]:
    """Binned statistics of `tune_a`, `tune_b` (the tuning split's two halves) and `held_out`, small cells pooled."""
    raw = model_raw(table, model_text, threads=threads) if table.y.size else np.zeros(0)
    parts = {
        "tune_a": table.rows(TUNING_SPLIT, 0),
        "tune_b": table.rows(TUNING_SPLIT, 1),
        "held_out": table.rows(HELD_OUT_SPLIT),
    }
    arrays = {}
    for part, mask in parts.items():
        binned = BinnedScores.from_rows(raw[mask], table.y[mask]).with_small_cells_pooled(min_cell_rows)
        arrays[f"{part}:n"] = binned.n
        arrays[f"{part}:pos"] = binned.pos
        arrays[f"{part}:sum"] = binned.score_sum
    held = parts["held_out"]
    metrics = {"held_out_auroc": auroc(table.y[held], raw[held])} if held.any() else {}
    return arrays, {"n_held_out": int(held.sum())}, metrics
