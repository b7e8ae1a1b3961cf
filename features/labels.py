"""Labels for a task from MEDS events, and MEDS label files from elsewhere.

Everything is computed from one small table per subject (birth, death, first
and last event, first time each concept group was recorded) joined to the
prediction times, so extraction costs one pass over the events. The time
rules are in `tasks.py`'s docstring.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import date, datetime, timedelta
from pathlib import Path

import polars as pl

from chronorisk.data import codes as vocab
from chronorisk.data.meds_io import LABEL_SCHEMA
from chronorisk.errors import InputError
from chronorisk.features.concepts import ConceptMap, load_concepts
from chronorisk.features.tasks import TaskDefinition, data_span, load_task

_US = pl.Datetime("us")


def _role_concepts(task: TaskDefinition) -> dict[str, tuple[str, ...]]:
    """Concept groups whose first recording time decides eligibility or the outcome."""
    p = task.population
    roles: dict[str, tuple[str, ...]] = {
        "any_of": p.any_of,
        "none_of": p.none_of,
        "excluded": task.excluding_concepts(),
    }
    for i, concept in enumerate(p.all_of):
        roles[f"all_of_{i}"] = (concept,)
    return {k: v for k, v in roles.items() if v}


def subject_table(events: pl.LazyFrame, task: TaskDefinition, concepts: ConceptMap | None = None) -> pl.LazyFrame:
    """Per subject: birth, death, first/last timed event, first time of each concept group."""
    return _subject_table_of_roles(events, _role_concepts(task), concepts)


def _subject_table_of_roles(events: pl.LazyFrame, roles: dict[str, tuple[str, ...]],
                            concepts: ConceptMap | None = None, codes: pl.Series | None = None) -> pl.LazyFrame:
    """`subject_table` with a `first_<role>` column per entry of `roles` (role -> concept group).

    `codes`, when the events' distinct codes are known already (events in memory), are matched to
    concepts from the concept map's memo instead of in the plan."""
    cmap = concepts or load_concepts()
    timed = events.select("subject_id", "time", "code").filter(pl.col("time").is_not_null())
    facts = [
        pl.col("time").filter(pl.col("code") == vocab.BIRTH).min().alias("birth"),
        pl.col("time").filter(pl.col("code") == vocab.DEATH).min().alias("death"),
        pl.col("time").filter(pl.col("code") != vocab.BIRTH).min().alias("first_event"),
        pl.col("time").max().alias("last_event"),
    ]
    needed = sorted({c for group in roles.values() for c in group})
    if not needed:
        return timed.group_by("subject_id").agg(facts)
    if codes is not None:
        # the events' codes are known: each role's codes come from the memo, and one aggregation makes
        # the table (no join; the same first times as the join below gives, tests/features/test_features_labels.py)
        table = cmap.concept_table_of_codes(codes.to_list(), needed)
        role_codes = {role: sorted({code for code, concept in table.iter_rows() if concept in group})
                      for role, group in roles.items()}
        return timed.group_by("subject_id").agg(
            *facts, *(pl.col("time").filter(pl.col("code").is_in(role_codes[role])).min().alias(f"first_{role}")
                      for role in roles))
    base = timed.group_by("subject_id").agg(facts)
    table = cmap.concept_table(timed, needed)
    tagged = timed.join(table, on="code", how="inner")
    firsts = tagged.group_by("subject_id").agg(
        pl.col("time").filter(pl.col("concept").is_in(list(group))).min().alias(f"first_{role}")
        for role, group in roles.items()
    )
    return base.join(firsts, on="subject_id", how="left")


def _times_frame(times: Iterable[datetime | date] | pl.Series) -> pl.LazyFrame:
    values = sorted({t if isinstance(t, datetime) else datetime(t.year, t.month, t.day) for t in times})
    return pl.LazyFrame({"prediction_time": pl.Series(values, dtype=_US)})


def _eligible(subjects: pl.LazyFrame, times: pl.LazyFrame, task: TaskDefinition) -> pl.LazyFrame:
    """Subject x time rows in the population at t (only what was recorded before t decides)."""
    t = pl.col("prediction_time")
    p = task.population
    cond = (pl.col("first_event") < t) & (pl.col("death").is_null() | (pl.col("death") > t))
    # the columns `subject_table` made (known from the task: resolving the plan's schema costs more)
    schema = [f"first_{role}" for role in _role_concepts(task)]
    if "first_any_of" in schema:
        cond &= pl.col("first_any_of") < t
    for name in schema:
        if name.startswith("first_all_of_"):
            cond &= pl.col(name) < t
    for role in ("first_none_of", "first_excluded"):
        if role in schema:
            cond &= pl.col(role).is_null() | (pl.col(role) >= t)
    if p.min_age_years is not None or p.max_age_years is not None:
        age = (t - pl.col("birth")).dt.total_days() / 365.25
        cond &= pl.col("birth").is_not_null() & (pl.col("birth") < t)
        if p.min_age_years is not None:
            cond &= age >= p.min_age_years
        if p.max_age_years is not None:
            cond &= age < p.max_age_years
    return subjects.join(times, how="cross").filter(cond)


def _resolve_times(
    events: pl.LazyFrame, task: TaskDefinition, times: Iterable[datetime | date] | pl.Series | None
) -> pl.LazyFrame:
    chosen = task.schedule_from_events(events) if times is None else list(times)
    return _times_frame(chosen)


def eligible_index(
    events: pl.LazyFrame,
    task: TaskDefinition | str,
    times: Sequence[datetime | date] | pl.Series | None = None,
    concepts: ConceptMap | None = None,
) -> pl.LazyFrame:
    """(subject_id, prediction_time) of everyone in the task population at `times`.

    For scoring at given dates: no outcome and no censoring are looked at.
    `times` defaults to the task schedule over the span of `events`.
    """
    task = load_task(task)
    subjects = subject_table(events, task, concepts)
    return (
        _eligible(subjects, _resolve_times(events, task, times), task)
        .select("subject_id", pl.col("prediction_time").cast(_US))
        .sort("subject_id", "prediction_time")
    )


def eligible_indexes(
    events: pl.LazyFrame | pl.DataFrame,
    tasks: Sequence[TaskDefinition],
    times: Sequence[datetime | date],
    concepts: ConceptMap | None = None,
    **collect_options,
) -> list[pl.DataFrame]:
    """`eligible_index` of each task at `times`, from one subject table holding every task's concept groups:
    one pass over the events instead of one per task (serving decides every task of a patient at once).
    The same rules (`_eligible`) on the same per-subject facts; `collect_options` go to polars' collect."""
    roles = {f"{i}_{role}": group for i, task in enumerate(tasks) for role, group in _role_concepts(task).items()}
    codes = events.get_column("code").unique() if isinstance(events, pl.DataFrame) else None
    subjects = _subject_table_of_roles(events.lazy(), roles, concepts, codes).collect(**collect_options)
    base = ["subject_id", "birth", "death", "first_event", "last_event"]
    times_frame = _times_frame(times)
    plans = []
    for i, task in enumerate(tasks):
        mine = subjects.lazy().select(*base, *[pl.col(f"first_{i}_{role}").alias(f"first_{role}")
                                               for role in _role_concepts(task)])
        plans.append(_eligible(mine, times_frame, task).select("subject_id", pl.col("prediction_time").cast(_US))
                     .sort("subject_id", "prediction_time"))
    return pl.collect_all(plans, **collect_options)


def extract_labels(
    events: pl.LazyFrame,
    task: TaskDefinition | str,
    times: Sequence[datetime | date] | pl.Series | None = None,
    concepts: ConceptMap | None = None,
) -> pl.DataFrame:
    """MEDS labels (subject_id, prediction_time, boolean_value) for `task` from MEDS `events`."""
    task = load_task(task)
    task.require_extractable()
    cmap = concepts or load_concepts()
    subjects = subject_table(events, task, cmap)
    _, data_end = data_span(events)
    rows = _eligible(subjects, _resolve_times(events, task, times), task)
    outcome = _outcome_events(events, task, cmap)
    rows = rows.sort("prediction_time").join_asof(
        outcome,
        left_on="prediction_time",
        right_on="outcome_time",
        by="subject_id",
        strategy="forward",
        check_sortedness=False,
    )
    t = pl.col("prediction_time")
    end = t + pl.duration(days=task.horizon_days)
    has_outcome = pl.col("outcome_time").is_not_null() & (pl.col("outcome_time") <= end)
    died = pl.col("death").is_not_null() & (pl.col("death") <= end)
    record_end = pl.col("last_event")
    if data_end is not None:
        grace = data_end - timedelta(days=task.censoring.followup_grace_days)
        record_end = pl.when(record_end >= grace).then(pl.lit(data_end, dtype=_US)).otherwise(record_end)
    record_short = record_end < end
    cens = task.censoring
    keep = (
        has_outcome
        | (died & pl.lit(cens.death == "negative"))
        | (~died & record_short & pl.lit(cens.end_of_record == "negative"))
        | (~died & ~record_short)
    )
    return (
        rows.filter(keep)
        .select(
            pl.col("subject_id").cast(pl.Int64),
            t.cast(_US),
            has_outcome.alias("boolean_value"),
        )
        .sort("subject_id", "prediction_time")
        .collect()
    )


def _outcome_events(events: pl.LazyFrame, task: TaskDefinition, cmap: ConceptMap) -> pl.LazyFrame:
    """Distinct (subject_id, outcome_time) of outcome concept records, sorted by time."""
    timed = events.select("subject_id", "time", "code").filter(pl.col("time").is_not_null())
    table = cmap.concept_table(timed, list(task.outcome_concepts)).select("code").unique()
    return (
        timed.join(table, on="code", how="semi")
        .select("subject_id", pl.col("time").cast(_US).alias("outcome_time"))
        .unique()
        .sort("outcome_time")
    )


# ---- label files from elsewhere -------------------------------------------------------
def label_files(given: Path | str, task: str) -> list[Path]:
    """The label files of ONE task that `--labels PATH` means, in every command (one rule).

    - a parquet file: that file;
    - a folder holding `<task>/` (a labels root, e.g. `<work>/labels`): the files under `<task>/`,
      whatever other tasks' folders it holds;
    - a folder holding `<task>.parquet`: that file;
    - a folder with parquet files directly in it: one task's label files (e.g. one per site).
    A folder whose label files are only in subfolders not named `<task>` holds other tasks: an error
    that names them (reading them all would mix tasks).
    """
    path = Path(given)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise InputError("--labels", f"{path} does not exist (expected a label parquet file or folder)")
    for candidate in (path / task, path / f"{task}.parquet"):
        if candidate.is_dir():
            files = sorted(candidate.glob("**/*.parquet"))
            if not files:
                raise InputError("--labels", f"{candidate} holds no .parquet label files")
            return files
        if candidate.is_file():
            return [candidate]
    files = sorted(path.glob("*.parquet"))
    if files:
        return files
    others = sorted({f.relative_to(path).parts[0] for f in path.glob("*/**/*.parquet")})
    if others:
        raise InputError(
            "--labels", f"{path} holds no labels of task {task!r}: it is a labels root with "
            f"{', '.join(others)}/ (give the task's folder or a file, or use --task with one of those)"
        )
    raise InputError("--labels", f"{path} holds no .parquet label files")


def check_labels_for_tasks(given: Path | str | None, tasks: Sequence[str]) -> None:
    """With several tasks `--labels` must be a labels root holding each task's labels (never one set for all)."""
    if given is None or len(tasks) < 2:
        return
    path = Path(given)
    missing = [t for t in tasks if not ((path / t).is_dir() or (path / f"{t}.parquet").is_file())]
    if missing:
        raise InputError(
            "--labels", f"{path} holds no labels of task(s) {', '.join(missing)}: with several tasks give a "
            "labels root holding <task>/ (or <task>.parquet) for each, or one --task"
        )


def read_task_labels(given: Path | str, task: str) -> pl.DataFrame:
    """The labels of one task that `--labels PATH` means (`label_files`), sorted, checked."""
    return read_labels_files(label_files(given, task))


def read_labels(path: Path | str) -> pl.DataFrame:
    """Read MEDS label parquet (a file, or every parquet file under a folder), checking the label schema.

    Extra MEDS label columns (integer_value, float_value, categorical_value) are dropped. Commands
    take `--labels` through `read_task_labels`, which never mixes tasks.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("**/*.parquet"))
        if not files:
            raise InputError(str(path), "no .parquet label files in this folder")
    elif path.is_file():
        files = [path]
    else:
        raise InputError(str(path), "label file or folder does not exist")
    return read_labels_files(files)


def read_labels_files(files: Sequence[Path]) -> pl.DataFrame:
    """The rows of these label files, sorted on every column: the same frame whatever their order."""
    frames = [_read_label_file(f) for f in files]
    return pl.concat(frames, how="vertical").sort("subject_id", "prediction_time", "boolean_value")


def _read_label_file(path: Path) -> pl.DataFrame:
    try:
        schema = pl.read_parquet_schema(path)
    except Exception:  # not parquet at all: say so, whatever the reader raised
        raise InputError(str(path), "not a parquet file") from None
    wanted = dict(LABEL_SCHEMA)
    missing = [c for c in wanted if c not in schema]
    if missing:
        raise InputError(
            str(path),
            f"missing column(s) {', '.join(missing)}; MEDS labels need subject_id (int64), "
            "prediction_time (timestamp) and boolean_value (bool)",
        )
    checks = {
        "subject_id": schema["subject_id"].is_integer(),
        "prediction_time": isinstance(schema["prediction_time"], pl.Datetime),
        "boolean_value": schema["boolean_value"] == pl.Boolean,
    }
    for col, ok in checks.items():
        if not ok:
            raise InputError(str(path), f"column {col} has type {schema[col]}, expected {wanted[col]}")
    df = pl.read_parquet(path, columns=list(wanted))
    if df.null_count().sum_horizontal().item() > 0:
        nulls = [c for c in wanted if df[c].null_count()]
        raise InputError(str(path), f"null values in {', '.join(nulls)}")
    if df["prediction_time"].dtype.time_zone is not None:
        df = df.with_columns(pl.col("prediction_time").dt.convert_time_zone("UTC").dt.replace_time_zone(None))
    return df.select(pl.col(c).cast(t) for c, t in wanted.items())


def write_site_labels(source, task: TaskDefinition, path: Path, concepts: ConceptMap | None = None) -> pl.DataFrame:
    """Extract one site's labels (`source`: a `sources.SiteSource`) and write them atomically."""
    from chronorisk.data.meds_io import write_labels

    labels = extract_labels(source.scan(), task, concepts=concepts)
    write_labels(labels, path)
    return labels
