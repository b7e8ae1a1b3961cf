"""The data-driven vocabulary: which codes of the fitting data become features, from counts only.

`code_summary(events)` summarizes a site's events per code, without records:
subjects with the code, subjects and values with a number, values outside the
plausible range of `data/codes.py` (known measurements), the 0.1 % and 99.9 %
quantiles of the numbers of other codes (values are clipped to them), and, per
(code, text value), subjects with that text. Rows of a (code, text) pair have
`text` set; per-code rows have it null. Sites concatenate their summaries
(`merge_summaries` sums the counts; quantiles are averaged, weighted by values).

`select_codes(summary, config, cmap)` picks the vocabulary: every code seen in at
least `min_code_subjects` subjects that no concept feature already uses, the
`max_codes` most frequent (ties by code). A code whose numbers are seen in that
many subjects also gets value features; the `max_texts_per_code` most frequent
text values seen in that many subjects become categories. Text values of
concept codes that the concept does not read (a smoking answer no table knows)
become categories of that code too: no value is dropped without a feature or a
count in `fit_info`.
"""

from __future__ import annotations

from collections.abc import Iterable

import polars as pl

from chronorisk.data import codes as vocab
from chronorisk.errors import InputError
from chronorisk.features.concepts import ConceptMap
from chronorisk.features.config import FeatureConfig
from chronorisk.features.spec import CodeSpec, FeatureSpec

CLIP_QUANTILES = (0.001, 0.999)  # numbers of codes without a plausible range are clipped to these
SUMMARY_SCHEMA = {
    "code": pl.String,
    "text": pl.String,
    "n_subjects": pl.Int64,
    "n_value_subjects": pl.Int64,
    "n_values": pl.Int64,
    "n_out_of_range": pl.Int64,
    "value_lo": pl.Float64,
    "value_hi": pl.Float64,
}
_COUNTS = ("n_subjects", "n_value_subjects", "n_values", "n_out_of_range")

SPECIAL_CODES = frozenset(
    {vocab.BIRTH, vocab.DEATH, vocab.SEX_FEMALE, vocab.SEX_MALE, vocab.SMOKING_STATUS}
    | {f"{vocab.ENCOUNTER_PREFIX}{e}" for e in vocab.ENCOUNTER_CLASSES}
)


def plausible_table() -> pl.DataFrame:
    """(code, lo, hi): the plausible range of every code of a known measurement (data/codes.py)."""
    rows = [(code, float(m.plausible[0]), float(m.plausible[1])) for code, m in vocab.MEASUREMENT_BY_CODE.items()]
    return pl.DataFrame(rows, schema={"code": pl.String, "lo": pl.Float64, "hi": pl.Float64}, orient="row")


def _events(events: pl.LazyFrame | pl.DataFrame) -> pl.LazyFrame:
    frame = events.lazy()
    names = frame.collect_schema().names()
    for col in ("subject_id", "code"):
        if col not in names:
            raise InputError("events", f"missing column {col}; MEDS events need subject_id, time, code")
    value = pl.col("numeric_value").cast(pl.Float64) if "numeric_value" in names else pl.lit(None, pl.Float64)
    text = pl.col("text_value").cast(pl.String) if "text_value" in names else pl.lit(None, pl.String)
    return frame.select(
        "subject_id", pl.col("code").cast(pl.String),
        pl.when(value.is_finite()).then(value).alias("value"), text.alias("text"),
    ).filter(pl.col("code").is_not_null())


def code_summary(events: pl.LazyFrame | pl.DataFrame, min_subjects: int = 1) -> pl.DataFrame:
    """Counts per code and per (code, text value) (see module doc); rows under `min_subjects` are left out."""
    ev = _events(events)
    has_value = pl.col("value").is_not_null()
    per_code = ev.group_by("code").agg(
        pl.col("subject_id").n_unique().cast(pl.Int64).alias("n_subjects"),
        pl.col("subject_id").filter(has_value).n_unique().cast(pl.Int64).alias("n_value_subjects"),
        has_value.sum().cast(pl.Int64).alias("n_values"),
    )
    ranges = plausible_table().lazy()
    known = ev.filter(has_value).join(ranges, on="code", how="inner")
    out_of_range = known.group_by("code").agg(
        (~pl.col("value").is_between(pl.col("lo"), pl.col("hi"))).sum().cast(pl.Int64).alias("n_out_of_range")
    )
    lo, hi = CLIP_QUANTILES
    other = ev.filter(has_value).join(ranges, on="code", how="anti")
    quantiles = other.group_by("code").agg(
        pl.col("value").quantile(lo, "lower").alias("value_lo"),  # observed values: with under 1,000
        pl.col("value").quantile(hi, "higher").alias("value_hi"),  # values nothing is clipped
    )
    texts = ev.filter(pl.col("text").is_not_null()).group_by("code", "text").agg(
        pl.col("subject_id").n_unique().cast(pl.Int64).alias("n_subjects")
    )
    codes, oor, qs, txt = pl.collect_all([per_code, out_of_range, quantiles, texts])
    codes = codes.join(oor, on="code", how="left").join(qs, on="code", how="left")
    frame = pl.concat([codes, txt], how="diagonal_relaxed")
    return _conform(frame).filter(pl.col("n_subjects") >= min_subjects).sort("code", "text", nulls_last=False)


def _conform(frame: pl.DataFrame) -> pl.DataFrame:
    """A summary with every column of SUMMARY_SCHEMA (a site's older summary has code and n_subjects only)."""
    if not {"code", "n_subjects"} <= set(frame.columns):
        raise InputError("summary", f"needs columns code and n_subjects, got {frame.columns}")
    cols = []
    for name, dtype in SUMMARY_SCHEMA.items():
        if name in frame.columns:
            col = pl.col(name).cast(dtype)
            cols.append(col.fill_null(0) if name in _COUNTS else col)
        else:
            cols.append(pl.lit(0 if name in _COUNTS else None, dtype=dtype).alias(name))
    return frame.select(cols)


def merge_summaries(summaries: Iterable[pl.DataFrame]) -> pl.DataFrame:
    """Sum per-site summaries (sites do not share subjects); quantiles: mean weighted by values."""
    frames = [_conform(s) for s in summaries]
    if not frames:
        return pl.DataFrame(schema=SUMMARY_SCHEMA)
    weight = pl.col("n_values").cast(pl.Float64)

    def weighted(col: str) -> pl.Expr:
        ok = pl.col(col).is_not_null()
        return ((pl.col(col) * weight).filter(ok).sum() / weight.filter(ok).sum()).alias(col)

    merged = pl.concat(frames).group_by("code", "text").agg(
        *[pl.col(c).sum() for c in _COUNTS], weighted("value_lo"), weighted("value_hi"),
    )
    return merged.select(list(SUMMARY_SCHEMA)).sort("code", "text", nulls_last=False)


def _used_by_concepts(code: str, cmap: ConceptMap, known: set[str]) -> bool:
    """Does a built-in (concept) feature already read this code?"""
    return code in known or code in SPECIAL_CODES or cmap.is_condition_code(code)


def read_as_concept(code: str, text: str) -> bool:
    """Does a concept feature read this (code, text value)? (smoking answers, for now)"""
    return code == vocab.SMOKING_STATUS and vocab.smoking_status_of_text(text) is not None


def select_codes(summary: pl.DataFrame, config: FeatureConfig, cmap: ConceptMap) -> tuple[list[CodeSpec], dict]:
    """The vocabulary (see module doc) and what the selection left out, as counts for `fit_info`."""
    merged = merge_summaries([summary])
    per_code = merged.filter(pl.col("text").is_null())
    texts = merged.filter(pl.col("text").is_not_null())
    known = cmap.known_codes()
    need = config.min_code_subjects
    frequent = per_code.filter(pl.col("n_subjects") >= need)
    candidates = [
        row for row in frequent.iter_rows(named=True) if not _used_by_concepts(row["code"], cmap, known)
    ]
    candidates.sort(key=lambda r: (-r["n_subjects"], r["code"]))
    chosen = candidates[: config.max_codes]
    categories = _text_categories(texts, need, config.max_texts_per_code)
    out: list[CodeSpec] = []
    for row in chosen:
        values = row["n_value_subjects"] >= need
        clip = None
        if values and row["value_lo"] is not None and row["code"] not in vocab.MEASUREMENT_BY_CODE:
            clip = (float(row["value_lo"]), float(row["value_hi"]))
        out.append(CodeSpec(
            code=row["code"], display=vocab.display_for(row["code"]) or row["code"], n_subjects=row["n_subjects"],
            values=values, clip=clip, texts=categories.pop(row["code"], ()),
        ))
    concept_texts = sorted(c for c in categories if _used_by_concepts(c, cmap, known))
    for code in concept_texts:  # text values a concept does not read: categories of the concept's code
        out.append(CodeSpec(code=code, display=vocab.display_for(code) or code, n_subjects=0, counts=False,
                            texts=categories[code]))
    unread = sum(1 for code, text in texts.select("code", "text").iter_rows() if not read_as_concept(code, text))
    left = {
        "codes_in_summary": per_code.height,
        "codes_frequent": frequent.height,
        "codes_over_max_codes": max(0, len(candidates) - len(chosen)),
        "codes_under_min_subjects": per_code.height - frequent.height,
        "text_values_without_feature": int(unread - sum(len(c.texts) for c in out)),
        "values_out_of_range": {
            code: n for code, n in per_code.filter(pl.col("n_out_of_range") > 0)
            .select("code", "n_out_of_range").iter_rows()
        },
        # numbers of each known measurement: the denominator of the share above (monitoring's reference)
        "values_of_known_codes": {
            code: n for code, n in per_code.filter(pl.col("code").is_in(list(vocab.MEASUREMENT_BY_CODE))
                                                   & (pl.col("n_values") > 0))
            .select("code", "n_values").iter_rows()
        },
    }
    return out, left


def _text_categories(texts: pl.DataFrame, need: int, per_code: int) -> dict[str, tuple[str, ...]]:
    """code -> its most frequent text values (>= `need` subjects, at most `per_code`), not read by a concept."""
    rows = [r for r in texts.filter(pl.col("n_subjects") >= need).iter_rows(named=True)
            if not read_as_concept(r["code"], r["text"])]
    rows.sort(key=lambda r: (r["code"], -r["n_subjects"], r["text"]))
    out: dict[str, list[str]] = {}
    for r in rows:
        chosen = out.setdefault(r["code"], [])
        if len(chosen) < per_code:
            chosen.append(r["text"])
    return {code: tuple(v) for code, v in out.items()}


def dropping_codes(spec: FeatureSpec) -> pl.DataFrame:
    """(code, lo, hi): the known measurements whose numbers `spec`'s features read and drop when outside
    their plausible range (measurement concepts and vocabulary codes with values)."""
    read = {c for m in spec.measurements for c in m.codes} | {c.code for c in spec.codes if c.values}
    return plausible_table().filter(pl.col("code").is_in(sorted(read)))


INPUT_CHECK_SCHEMA = {"date": pl.Date, "code": pl.String, "n_values": pl.Int64, "n_dropped": pl.Int64,
                      "dropped_median": pl.Float64}


def input_checks(spec: FeatureSpec, events: pl.LazyFrame | pl.DataFrame,
                 index: pl.LazyFrame | pl.DataFrame, *, per_subject: bool = False) -> pl.DataFrame:
    """Per prediction day and code: the numbers the scored rows' features read, how many they dropped as
    impossible (outside the plausible range, `dropping_codes`) and the median of those dropped.

    `index` holds the scored rows (subject_id, prediction_time). A row reads its subject's events before
    the prediction time within the spec's longest window (`windows_days`); an event read by several rows
    of one day (the same subject scored twice that day) counts once per day (the union of the day's
    look-backs); two recorded events with the same value both count, as both feed the features. Counts only:
    no identifier leaves this function (columns of INPUT_CHECK_SCHEMA), unless `per_subject` asks for a
    `subject_id` column first: the counts of each subject apart (what a run of that subject alone gives),
    for a caller that checks several requests at once and drops the column itself.
    """
    schema = {"subject_id": pl.Int64, **INPUT_CHECK_SCHEMA} if per_subject else INPUT_CHECK_SCHEMA
    keys = ["subject_id", "date", "code"] if per_subject else ["date", "code"]
    ranges = dropping_codes(spec)
    if ranges.height == 0:
        return pl.DataFrame(schema=schema)
    look_back = pl.duration(days=max(spec.windows_days, default=0))
    # one row per (subject, day): the union of that day's look-backs, so each event counts once per day
    rows = index.lazy().select("subject_id", pl.col("prediction_time").cast(pl.Datetime("us"))).group_by(
        "subject_id", pl.col("prediction_time").dt.date().alias("date"),
    ).agg(pl.col("prediction_time").max().alias("until"), (pl.col("prediction_time").min() - look_back).alias("since"))
    rows = rows.collect()
    if rows.height == 0:
        return pl.DataFrame(schema=schema)
    # cheap bounds first (a time comparison), then the code test on what is left
    in_span = pl.col("time").is_between(rows["since"].min(), rows["until"].max(), closed="left")
    ev = events.lazy().filter(in_span).filter(pl.col("code").is_in(ranges["code"].implode())).select(
        "subject_id", pl.col("time").cast(pl.Datetime("us")), pl.col("code").cast(pl.String),
        pl.col("numeric_value").cast(pl.Float64).alias("value"),
    ).filter(pl.col("value").is_finite())
    read = ev.join(rows.lazy(), on="subject_id").filter(
        (pl.col("time") < pl.col("until")) & (pl.col("time") >= pl.col("since"))
    ).join(ranges.lazy(), on="code")
    dropped = ~pl.col("value").is_between(pl.col("lo"), pl.col("hi"))
    return (
        read.group_by(keys)
        .agg(pl.len().cast(pl.Int64).alias("n_values"), dropped.sum().cast(pl.Int64).alias("n_dropped"),
             pl.col("value").filter(dropped).median().alias("dropped_median"))
        .select(list(schema)).sort(keys).collect()
    )


def value_checks(spec: FeatureSpec, events: pl.LazyFrame) -> pl.DataFrame:
    """(code, dropped, clipped): numbers of `events` the features drop (outside the plausible range of a
    known measurement) or clip (to a vocabulary code's fitted quantiles), per code with any."""
    ranges = plausible_table().with_columns(pl.lit(True).alias("drops"))
    clips = pl.DataFrame(
        [(c.code, c.clip[0], c.clip[1]) for c in spec.codes if c.values and c.clip is not None],
        schema={"code": pl.String, "lo": pl.Float64, "hi": pl.Float64}, orient="row",
    ).with_columns(pl.lit(False).alias("drops"))
    table = pl.concat([ranges, clips]).unique("code", keep="first")
    outside = ~pl.col("value").is_between(pl.col("lo"), pl.col("hi"))
    return (
        _events(events).filter(pl.col("value").is_not_null()).join(table.lazy(), on="code", how="inner")
        .group_by("code")
        .agg((outside & pl.col("drops")).sum().alias("dropped"), (outside & ~pl.col("drops")).sum().alias("clipped"))
        .filter((pl.col("dropped") > 0) | (pl.col("clipped") > 0))
        .sort("code")
        .collect()
    )
