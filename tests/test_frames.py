"""`chronorisk.frames` gives what the polars calls it stands for give, column order and dtypes included."""

from __future__ import annotations

from datetime import datetime

import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

from chronorisk.frames import pick_columns, stack, without_column


def wide(rows: int, dtype=pl.Float32, subject: bool = True) -> pl.DataFrame:
    data = {"subject_id": pl.Series(range(rows), dtype=pl.Int64),
            "prediction_time": pl.Series([datetime(2025, 7, 1)] * rows, dtype=pl.Datetime("us")),
            **{f"f{i}": pl.Series([float(i + r) if (i + r) % 3 else None for r in range(rows)], dtype=dtype)
               for i in range(40)},
            "site": pl.Series(["a"] * rows, dtype=pl.String)}
    if not subject:
        data.pop("subject_id")
    return pl.DataFrame(data)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(0, 4), picks=st.lists(st.sampled_from(wide(1).columns), unique=True, max_size=10))
def test_pick_columns_is_select(rows, picks):
    frame = wide(rows)
    assert pick_columns(frame, picks).equals(frame.select(picks))
    assert pick_columns(frame, picks).schema == frame.select(picks).schema


@given(rows=st.integers(0, 4), subject=st.booleans())
def test_without_column_is_drop_and_leaves_the_frame_whole(rows, subject):
    frame = wide(rows, subject=subject)
    before = frame.clone()
    out = without_column(frame, "subject_id")
    assert out.equals(frame.drop("subject_id", strict=False))
    assert out.columns == frame.drop("subject_id", strict=False).columns
    assert frame.equals(before) and frame.columns == before.columns  # the caller's frame keeps its column


def test_stack_is_diagonal_relaxed_concat():
    same = [wide(1), wide(2), wide(0)]
    assert stack(same).equals(pl.concat(same, how="diagonal_relaxed"))
    mixed = [wide(1), wide(2, dtype=pl.Float64), wide(1, subject=False)]  # other dtypes, a missing column
    out = stack(mixed)
    assert out.equals(pl.concat(mixed, how="diagonal_relaxed"))
    assert out.schema == pl.concat(mixed, how="diagonal_relaxed").schema
    assert out["subject_id"].null_count() == 1
