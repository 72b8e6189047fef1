"""Unit tests of the tabular tasks (common/tasks/tabular.py): the packaged tables load offline with the pinned
pandas, every preprocessing statistic comes from the public set only, clinics partition naturally, and
an institution's own table is standardised with the public statistics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from flwr.app import RecordDict

from client.site import load_site
from common.config import RunConfig, default_run_config
from common.errors import ConfigError, DataError
from common.node_config import NodeConfig
from common.tasks.partition import natural_groups, partition_rows
from common.tasks.registry import load_split
from common.tasks.samples import TabularSet, public_fingerprint
from common.tasks.tabular import SCHEMAS, TabularEncoder, load_table

COVID = {"dataset": "covid-testing", "public-size": 2000, "num-clients": 5, "min-clients": 3, "partitioner": "natural",
         "teacher-models": "mlp-deep,mlp", "student-model": "mlp-student"}


def make_cfg(**overrides: Any) -> RunConfig:
    return RunConfig.from_run_config({**default_run_config(), **COVID, **overrides})


@pytest.mark.parametrize(("dataset", "rows", "classes"), [("covid-testing", 15_524, 3), ("credit-data", 4_454, 2)])
def test_packaged_tables_load_offline_with_the_pinned_pandas(dataset: str, rows: int, classes: int) -> None:
    # Execute
    frame = load_table(dataset)
    split = load_split(dataset, "", 500, 0)

    # Assert: the pickled DataFrame reads, with the schema's columns, and its labels map to the classes
    assert isinstance(frame, pd.DataFrame) and len(frame) == rows
    schema = SCHEMAS[dataset]
    assert set(schema.numeric + schema.categorical + (schema.label,)) <= set(frame.columns)
    assert len(split.public) + len(split.private) + len(split.test) == rows
    assert len(split.test) == rows // 5
    assert split.task == "tabular" and split.public.num_classes == classes
    assert np.bincount(split.private.labels, minlength=classes).min() > 0


def test_statistics_come_from_the_public_rows_only() -> None:
    # Prepare
    split = load_split("credit-data", "", 800, 3)
    frame = load_table("credit-data")
    public_rows = np.sort(np.random.default_rng(3).permutation(len(frame))[:800])

    # Execute: fit on the public rows alone, and on the public rows with the private pool's rows altered
    alone = TabularEncoder.fit(SCHEMAS["credit-data"], frame.iloc[public_rows])

    # Assert: the split's encoder is exactly the public-only one; the public set is centred, the rest is not
    assert split.preprocessor.feature_names == alone.feature_names
    np.testing.assert_array_equal(split.preprocessor.mean, alone.mean)
    np.testing.assert_array_equal(split.preprocessor.std, alone.std)
    np.testing.assert_allclose(split.public.features.mean(axis=0), 0.0, atol=1e-5)
    assert np.abs(split.private.features.mean(axis=0)).max() > 1e-3


def test_encoding_fills_flags_and_one_hot_encodes() -> None:
    # Prepare: a public set with one missing income and two homes
    schema = SCHEMAS["credit-data"]
    public = load_table("credit-data").iloc[:50].copy()
    public["Home"] = ["rent", "owner"] * 25
    public.loc[public.index[0], "Income"] = np.nan
    encoder = TabularEncoder.fit(schema, public)
    row = public.iloc[[1]].copy()
    row["Home"] = "castle"  # never seen in the public set
    row["Income"] = np.nan

    # Execute
    encoded = encoder.encode(row)[0]

    # Assert: unseen level -> all zeros; missing number -> public median of log1p(income) and flagged
    names = list(encoder.feature_names)
    assert [encoded[names.index(f"Home={level}")] for level in ("owner", "rent")] == [0.0, 0.0]
    assert encoded[names.index("Income=missing")] == 1.0
    assert encoded[names.index("Income")] == pytest.approx(np.nanmedian(np.log1p(public["Income"])))
    assert "Assets=missing" not in names or public["Assets"].isna().any()


def test_natural_groups_keep_the_largest_institutions_and_fold_the_rest() -> None:
    # Prepare: institution 7 has 5 rows, 2 has 3, 9 has 2, 4 and 5 have 1
    ids = np.array([7, 7, 7, 7, 7, 2, 2, 2, 9, 9, 4, 5])

    # Execute
    groups = natural_groups(ids, 3)

    # Assert
    assert groups.tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    assert natural_groups(ids, 5).tolist() == [0] * 5 + [1] * 3 + [2, 2, 3, 4]
    with pytest.raises(DataError, match="only 5 natural institutions; lower num-clients to at most 5"):
        natural_groups(ids, 6)


def test_clinics_partition_naturally() -> None:
    # Prepare
    cfg = make_cfg()
    split = load_split(cfg.dataset, cfg.data_dir, cfg.public_size, cfg.seed, cfg.test_size)

    # Execute
    parts = [partition_rows(split, cfg, pid) for pid in range(cfg.num_clients)]

    # Assert: every private row in exactly one part; parts 0-3 are single clinics, largest first
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(split.private)))
    for pid, rows in enumerate(parts[:4]):
        assert len(np.unique(split.groups[rows])) == 1, pid
    assert [len(p) for p in parts[:4]] == sorted((len(p) for p in parts[:4]), reverse=True)
    assert len(np.unique(split.groups[parts[4]])) > 10  # the small clinics, pooled


def test_natural_partitioner_needs_a_dataset_with_institutions() -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match="partitioner 'natural' needs a dataset whose rows name their institution"):
        make_cfg(dataset="credit-data")
    with pytest.raises(ConfigError, match="model 'cnn-small' does not fit dataset covid-testing \\(tabular task\\)"):
        make_cfg(**{"teacher-models": "cnn-small,mlp"})


def test_own_table_is_standardised_with_the_public_statistics(tmp_path: Path) -> None:
    # Prepare: institution 0's rows exported in encoded (not standardised) units
    cfg = make_cfg()
    split = load_split(cfg.dataset, cfg.data_dir, cfg.public_size, cfg.seed, cfg.test_size)
    encoder = split.preprocessor
    rows = partition_rows(split, cfg, 2)
    raw = split.private.features[rows] * encoder.std.astype(np.float32) + encoder.mean.astype(np.float32)
    table = pd.DataFrame(raw, columns=list(encoder.feature_names))
    table.insert(0, "label", [("negative", "positive", "invalid")[i] for i in split.private.labels[rows]])  # by name
    table.to_csv(tmp_path / "clinic.csv", index=False)

    # Execute
    site = load_site(cfg, NodeConfig(data_path=str(tmp_path / "clinic.csv")), RecordDict())

    # Assert: the same rows the partition holds, in the same units; the public set and fingerprint unchanged
    assert isinstance(site.private, TabularSet)
    np.testing.assert_allclose(site.private.features, split.private.features[rows], atol=1e-4)
    np.testing.assert_array_equal(site.private.labels, split.private.labels[rows])
    assert site.fingerprint == public_fingerprint(split.public)


def test_own_table_with_other_columns_is_refused(tmp_path: Path) -> None:
    # Prepare
    cfg = make_cfg()
    pd.DataFrame({"label": [0, 1], "age": [3.0, 4.0]}).to_csv(tmp_path / "clinic.csv", index=False)

    # Execute / Assert
    with pytest.raises(DataError, match="feature columns that differ from the scenario's"):
        load_site(cfg, NodeConfig(data_path=str(tmp_path / "clinic.csv")), RecordDict())
