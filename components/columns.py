"""Strict coercion of a table's columns into the canonical types, with clear errors.

Every value of a column must be of the kind the column holds (ids: strings or whole numbers; ratings:
numbers; timestamps: whole unix seconds or milliseconds, or ISO datetimes). Anything else (a fraction
where whole seconds are expected, a value beyond any plausible time, datetimes where numbers are
expected, lists, mappings, bytes, booleans, one column mixing kinds) raises DataValidationError
naming the file, the column and a few offending values, each shortened: messages never echo raw
lines of a file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from pandas.api.types import infer_dtype

from components.errors import DataValidationError

MAX_EXAMPLES = 3
EXAMPLE_CHARS = 40
SAFE_INT = 2**53  # every whole number up to this is exact as a float; no plausible unix time is near it
NUMBER_KINDS = {"integer", "floating", "mixed-integer-float", "empty"}
ID_KINDS = NUMBER_KINDS | {"string"}


def short(value: object, width: int = EXAMPLE_CHARS) -> object:
    """A value fit for a message: numbers as they are, text and anything else as a truncated string."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, bool | int | float):
        return value
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def examples(values: pd.Series, n: int = MAX_EXAMPLES) -> list:
    """The first few values, shortened."""
    return [short(v) for v in values.head(n).tolist()]


def rejection(
    path: Path | str, column: str, problem: str, bad: pd.Series, expectation: str
) -> DataValidationError:
    """The error for a column whose values `bad` break `expectation`."""
    shown = examples(bad)
    return DataValidationError(
        f"{path}: column '{column}' {problem}, e.g. {shown}",
        file=str(path),
        column=column,
        expectation=expectation,
        examples=shown,
    )


def kind_of(values: pd.Series) -> str:
    """pandas' name for what the non-null values are ('string', 'integer', 'mixed', 'datetime64', ...)."""
    return infer_dtype(values, skipna=True)


def plain(values: pd.Series) -> pd.Series:
    """A categorical column as its values (kinds are judged on the values)."""
    return values.astype(object) if isinstance(values.dtype, pd.CategoricalDtype) else values


def odd_values(values: pd.Series, allowed: tuple[type, ...]) -> pd.Series:
    """Non-null values not of an allowed type; when every value is allowed (a mix of kinds),
    the values whose type differs from the most common one."""
    present = values[values.map(lambda v: not _is_missing(v))]
    allowed_mask = present.map(lambda v: isinstance(v, allowed) and not isinstance(v, bool | np.bool_))
    if (~allowed_mask).any():
        return present[~allowed_mask]
    types = present.map(lambda v: type(v).__name__)
    return present[types != types.mode().iat[0]] if len(types) else present


def _is_missing(value: object) -> bool:
    return (
        value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)) or value is pd.NaT
    )


def _kind_problem(kind: str, wanted: str) -> str:
    if kind.startswith("mixed"):
        return f"mixes kinds of values (or holds lists or mappings); {wanted}"
    return f"holds {kind} values; {wanted}"


def as_id(values: pd.Series, column: str, path: Path | str) -> pd.Series:
    """Ids as stripped strings; whole numbers (1, 1.0) become '1'; missing stays missing."""
    values = plain(values)
    kind = kind_of(values)
    wanted = "an id is a string or a whole number"
    if kind not in ID_KINDS:
        bad = odd_values(values, (str, int, float, np.integer, np.floating))
        raise rejection(path, column, _kind_problem(kind, wanted), bad, "id is a string or a whole number")
    if kind in ("floating", "mixed-integer-float"):
        numeric = pd.to_numeric(values).astype("float64")
        whole = np.isfinite(numeric) & (numeric == np.floor(numeric)) & (numeric.abs() <= SAFE_INT)
        bad = values[numeric.notna() & ~whole]
        if len(bad):
            raise rejection(path, column, f"has numbers that are not whole; {wanted}", bad, wanted)
        values = numeric.map(lambda v: pd.NA if pd.isna(v) else str(int(v)))
    return values.astype("string").str.strip()


def as_rating(values: pd.Series, column: str, path: Path | str) -> pd.Series:
    """Ratings as float64: numbers, or text that parses as a number."""
    values = plain(values)
    kind = kind_of(values)
    if kind == "string":
        numeric = pd.to_numeric(values, errors="coerce")
        bad = values[numeric.isna() & values.notna()]
        if len(bad):
            raise rejection(path, column, "has non-numeric values", bad, "rating is numeric")
    elif kind in NUMBER_KINDS:
        numeric = pd.to_numeric(values)
    else:
        bad = odd_values(values, (int, float, np.integer, np.floating))
        raise rejection(path, column, f"has non-numeric values ({kind})", bad, "rating is numeric")
    return numeric.astype("float64")


def as_text(values: pd.Series, column: str, path: Path | str) -> pd.Series:
    """Text columns (title, year, genres) as strings; lists, mappings, bytes and mixes are rejected."""
    values = plain(values)
    kind = kind_of(values)
    if kind not in ID_KINDS:
        bad = odd_values(values, (str, int, float, np.integer, np.floating))
        raise rejection(path, column, _kind_problem(kind, "expected text"), bad, "column holds text")
    return values.astype("string")


def as_unix_seconds(values: pd.Series, unit: str, path: Path | str, column: str = "timestamp") -> pd.Series:
    """Timestamps as int64 unix seconds (nullable Int64 only when some are missing).

    unit 's' / 'ms': whole numbers (or text of them) within +-2**53; 'iso': datetimes or ISO text.
    """
    values = plain(values)
    kind = kind_of(values)
    if unit == "iso":
        seconds = _iso_seconds(values, kind, path, column)
    else:
        seconds = _numeric_seconds(values, kind, unit, path, column)
    seconds = seconds.astype("Int64")
    # numpy int64 when complete; nullable Int64 only when values are missing (the not-null check names them)
    return seconds.astype("int64") if not seconds.isna().any() else seconds


def _iso_seconds(values: pd.Series, kind: str, path: Path | str, column: str) -> pd.Series:
    if kind.startswith("datetime") or kind in ("string", "empty"):
        parsed = pd.to_datetime(values, errors="coerce", utc=True)
        bad = values[parsed.isna() & values.notna()]
    else:
        parsed, bad = None, odd_values(values, (str,))
    if parsed is None or len(bad):
        raise rejection(path, column, "has values that are not iso timestamps", bad, "timestamp parses")
    return (parsed - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)


def _numeric_seconds(values: pd.Series, kind: str, unit: str, path: Path | str, column: str) -> pd.Series:
    what = f"not {unit} timestamps"
    if kind.startswith("datetime") or kind in ("date", "time", "period"):
        raise rejection(
            path,
            column,
            f"holds datetimes ({values.dtype}), {what}; set data.files.timestamp_unit: iso, or write "
            "unix times",
            values.dropna(),
            "timestamp parses",
        )
    if kind in ("string", "empty"):
        numeric = pd.to_numeric(values, errors="coerce")
        bad = values[numeric.isna() & values.notna()]
    elif kind in NUMBER_KINDS:
        numeric, bad = pd.to_numeric(values), values.iloc[:0]
    else:
        numeric, bad = None, odd_values(values, (int, float, np.integer, np.floating, str))
    if numeric is None or len(bad):
        raise rejection(path, column, f"has values that are {what}", bad, "timestamp parses")
    as_float = numeric.astype("float64")
    huge = numeric.notna() & ~(np.isfinite(as_float) & (as_float.abs() <= SAFE_INT))
    if huge.any():
        raise rejection(path, column, f"has values out of range for {unit} timestamps", values[huge], what)
    fraction = numeric.notna() & (as_float != np.floor(as_float))
    if fraction.any():
        whole = "whole seconds" if unit == "s" else "whole milliseconds"
        raise rejection(path, column, f"has fractional values; expected {whole}", values[fraction], what)
    whole_numbers = numeric.astype("Int64")
    return whole_numbers // 1000 if unit == "ms" else whole_numbers


def as_year(values: pd.Series, column: str, path: Path | str) -> pd.Series:
    """Years as nullable Int64: text that is not a number becomes missing (the items suite bounds the
    rest); a number that is not whole, or beyond any year, is rejected."""
    numeric = pd.to_numeric(values, errors="coerce").astype("float64")
    bad = numeric.notna() & ~(
        np.isfinite(numeric) & (numeric == np.floor(numeric)) & (numeric.abs() <= SAFE_INT)
    )
    if bad.any():
        raise rejection(
            path, column, "has years that are not whole numbers", values[bad], "year is a whole number"
        )
    return numeric.astype("Int64")
