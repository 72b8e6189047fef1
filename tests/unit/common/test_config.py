"""Unit tests of common/config.py: the typed, validated view of the run config."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.config import RunConfig, default_run_config
from common.errors import ConfigError

CONFIG_KEYS = sorted(f.name.replace("_", "-") for f in dataclasses.fields(RunConfig))


def test_default_run_config_holds_one_key_per_field() -> None:
    # Prepare
    expected = set(CONFIG_KEYS)

    # Execute
    defaults = default_run_config()

    # Assert
    assert set(defaults) == expected


def test_default_run_config_returns_a_fresh_mapping() -> None:
    # Prepare
    first = default_run_config()
    first["temperature"] = 99.0

    # Execute
    second = default_run_config()

    # Assert
    assert second["temperature"] == 5.0


def test_from_run_config_builds_defaults(run_config_mapping: dict[str, Any]) -> None:
    # Prepare: the golden values of pyproject.toml's [tool.flwr.app.config]
    mapping = run_config_mapping

    # Execute
    cfg = RunConfig.from_run_config(mapping)

    # Assert
    assert cfg.dataset == "fashion-mnist"
    assert cfg.public_size == 10000
    assert cfg.num_clients == 10
    assert cfg.min_clients == 5
    assert cfg.partitioner == "dirichlet"
    assert cfg.dirichlet_alpha == 0.5
    assert cfg.temperature == 5.0
    assert cfg.teacher_models == "scatter-pca-mlp"
    assert cfg.student_model == "cnn-student"
    assert (cfg.teacher_batch_size, cfg.teacher_lr, cfg.local_epochs) == (256, 0.003, 10)
    assert (cfg.num_server_rounds, cfg.student_epochs, cfg.public_fraction) == (1, 24, 0.8)
    assert cfg.codec == "uint8"
    assert cfg.aggregation == "inferred-expertise"
    assert cfg.round_timeout == 900.0
    assert cfg.evaluate_teachers is True


def test_to_dict_round_trips(run_config_mapping: dict[str, Any]) -> None:
    # Prepare
    cfg = RunConfig.from_run_config(run_config_mapping)

    # Execute
    as_dict = cfg.to_dict()
    rebuilt = RunConfig.from_run_config(as_dict)

    # Assert
    assert as_dict == run_config_mapping
    assert list(as_dict) == [f.name.replace("_", "-") for f in dataclasses.fields(RunConfig)]
    assert rebuilt == cfg


def test_config_is_frozen(run_config_mapping: dict[str, Any]) -> None:
    # Prepare
    cfg = RunConfig.from_run_config(run_config_mapping)

    # Execute / Assert
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.temperature = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("key", ["temperature", "dirichlet-alpha", "round-timeout", "ce-weight"])
def test_int_is_accepted_where_float_is_expected(run_config_mapping: dict[str, Any], key: str) -> None:
    # Prepare
    run_config_mapping[key] = 1 if key != "ce-weight" else 0

    # Execute
    value = getattr(RunConfig.from_run_config(run_config_mapping), key.replace("-", "_"))

    # Assert
    assert isinstance(value, float)
    assert value == float(run_config_mapping[key])


def test_every_key_problem_is_reported_at_once(run_config_mapping: dict[str, Any]) -> None:
    # Prepare: one missing, one unknown and two ill-typed keys
    del run_config_mapping["seed"]
    run_config_mapping["learning-rate"] = 0.1
    run_config_mapping["temperature"] = "hot"
    run_config_mapping["evaluate-teachers"] = 1

    # Execute
    with pytest.raises(ConfigError) as excinfo:
        RunConfig.from_run_config(run_config_mapping)

    # Assert
    message = str(excinfo.value)
    assert message.startswith("bad run config: ")
    assert "missing key 'seed'" in message
    assert "unknown key 'learning-rate'" in message
    assert "key 'temperature' must be float, got str 'hot'" in message
    assert "key 'evaluate-teachers' must be bool, got int 1" in message
    assert "pyproject.toml" in message


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("num-clients", 10.0, "key 'num-clients' must be int, got float 10.0"),
        ("num-clients", True, "key 'num-clients' must be int, got bool True"),
        ("temperature", True, "key 'temperature' must be float, got bool True"),
        ("temperature", "3.0", "key 'temperature' must be float, got str '3.0'"),
        ("evaluate-teachers", "true", "key 'evaluate-teachers' must be bool, got str 'true'"),
        ("codec", 16, "key 'codec' must be str, got int 16"),
        ("data-dir", None, "key 'data-dir' must be str, got NoneType None"),
    ],
)
def test_ill_typed_key_is_rejected(
    run_config_mapping: dict[str, Any], key: str, value: Any, expected: str
) -> None:
    # Prepare
    run_config_mapping[key] = value

    # Execute / Assert
    with pytest.raises(ConfigError, match=re.escape(expected)):
        RunConfig.from_run_config(run_config_mapping)


@settings(max_examples=30, deadline=None)
@given(missing=st.sets(st.sampled_from(CONFIG_KEYS), min_size=1), unknown=st.sets(st.text(min_size=1), max_size=3))
def test_any_missing_or_unknown_keys_are_all_named(missing: set[str], unknown: set[str]) -> None:
    # Prepare
    mapping = {k: v for k, v in default_run_config().items() if k not in missing}
    unknown -= set(CONFIG_KEYS)
    mapping.update({k: 1 for k in unknown})

    # Execute
    with pytest.raises(ConfigError) as excinfo:
        RunConfig.from_run_config(mapping)

    # Assert
    message = str(excinfo.value)
    for key in missing:
        assert f"missing key {key!r}" in message
    for key in unknown:
        assert f"unknown key {key!r}" in message


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"dataset": "cifar10"}, "dataset must be one of"),
        ({"partitioner": "shards"}, "partitioner must be one of"),
        ({"codec": "int8"}, "codec must be one of"),
        ({"aggregation": "krum"}, "aggregation must be one of"),
        ({"public-size": 0}, "public-size must be > 0, got 0"),
        ({"test-size": -1}, "test-size must be >= 0"),
        ({"num-clients": 0, "min-clients": 0}, "num-clients must be >= 1, got 0"),
        ({"min-clients": 11}, r"min-clients must be in \[1, num-clients=10\], got 11"),
        ({"min-clients": 0}, r"min-clients must be in \[1, num-clients=10\], got 0"),
        ({"dirichlet-alpha": 0.0}, "dirichlet-alpha must be > 0"),
        ({"classes-per-client": 0}, "classes-per-client must be >= 1"),
        ({"min-partition-size": -1}, "min-partition-size must be >= 0"),
        ({"num-server-rounds": 0}, "num-server-rounds must be >= 1"),
        ({"temperature": 0.0}, "temperature must be > 0, got 0.0"),
        ({"temperature": -1.0}, "temperature must be > 0, got -1.0"),
        ({"temperature": math.nan}, "temperature must be > 0, got nan"),
        ({"local-epochs": -1}, "local-epochs must be >= 0"),
        ({"local-min-steps": -1}, r"local-min-steps must be >= 0 \(0 = off\), got -1"),
        ({"student-epochs": 0}, "student-epochs must be >= 1"),
        ({"teacher-lr": 0.0}, "teacher-lr, student-lr and fedavg-lr must be > 0"),
        ({"student-lr": -0.1}, "teacher-lr, student-lr and fedavg-lr must be > 0"),
        ({"fedavg-lr": 0.0}, "teacher-lr, student-lr and fedavg-lr must be > 0"),
        ({"teacher-batch-size": 0}, "teacher-batch-size, student-batch-size and fedavg-batch-size must be >= 1"),
        ({"fedavg-batch-size": 0}, "teacher-batch-size, student-batch-size and fedavg-batch-size must be >= 1"),
        ({"fedavg-local-epochs": -1}, "fedavg-local-epochs must be >= 0, got -1"),
        ({"ce-weight": 1.5, "labelled-size": 10}, r"ce-weight must be in \[0, 1\], got 1.5"),
        ({"ce-weight": 0.5}, "ce-weight > 0 needs labelled-size > 0"),
        ({"labelled-size": 10001}, r"labelled-size must be in \[0, public-size=10000\], got 10001"),
        ({"round-timeout": 0.0}, "round-timeout and node-wait-timeout must be > 0"),
        ({"max-in-flight": -1}, r"max-in-flight must be >= 0 \(0 = every node at once\), got -1"),
        ({"node-wait-timeout": -5.0}, "round-timeout and node-wait-timeout must be > 0"),
        ({"torch-threads": 0}, "torch-threads must be >= 1"),
        ({"output-dir": ""}, "output-dir must not be empty"),
        ({"student-model": "resnet"}, "unknown model 'resnet'; known models: bert-small, bert-tiny, cnn-large, cnn-small"),
        ({"teacher-models": "cnn-small,vit"}, "unknown model 'vit'"),
        ({"teacher-models": " , "}, "teacher-models must name at least one model"),
    ],
)
def test_out_of_range_value_is_rejected(
    run_config_mapping: dict[str, Any], changes: dict[str, Any], expected: str
) -> None:
    # Prepare
    run_config_mapping.update(changes)

    # Execute / Assert
    with pytest.raises(ConfigError, match=f"^bad run config: .*{expected}"):
        RunConfig.from_run_config(run_config_mapping)


def test_every_range_problem_is_reported_at_once(run_config_mapping: dict[str, Any]) -> None:
    # Prepare
    run_config_mapping.update({"temperature": 0.0, "torch-threads": 0, "codec": "int8"})

    # Execute
    with pytest.raises(ConfigError) as excinfo:
        RunConfig.from_run_config(run_config_mapping)

    # Assert
    message = str(excinfo.value)
    assert "temperature must be > 0" in message
    assert "torch-threads must be >= 1" in message
    assert "codec must be one of" in message


def test_labelled_rows_allow_a_cross_entropy_weight(run_config_mapping: dict[str, Any]) -> None:
    # Prepare
    run_config_mapping.update({"ce-weight": 0.5, "labelled-size": 1000})

    # Execute
    cfg = RunConfig.from_run_config(run_config_mapping)

    # Assert
    assert (cfg.ce_weight, cfg.labelled_size) == (0.5, 1000)


def test_teacher_models_are_assigned_round_robin(run_config_mapping: dict[str, Any]) -> None:
    # Prepare
    cfg = RunConfig.from_run_config({**run_config_mapping, "teacher-models": "cnn-small,cnn-large"})

    # Execute
    assigned = [cfg.teacher_model_for(partition_id) for partition_id in range(5)]

    # Assert
    assert assigned == ["cnn-small", "cnn-large", "cnn-small", "cnn-large", "cnn-small"]


def test_teacher_model_list_strips_blanks_and_empty_names(run_config_mapping: dict[str, Any]) -> None:
    # Prepare
    run_config_mapping["teacher-models"] = " cnn-large , ,cnn-student,"
    cfg = RunConfig.from_run_config(run_config_mapping)

    # Execute
    names = cfg.teacher_model_list

    # Assert
    assert names == ["cnn-large", "cnn-student"]
    assert [cfg.teacher_model_for(i) for i in range(3)] == ["cnn-large", "cnn-student", "cnn-large"]


@pytest.mark.parametrize(
    ("local_epochs", "min_steps", "batch", "examples", "expected"),
    [
        (1, 0, 64, 500, 1),      # off: local-epochs as configured
        (3, 0, 64, 50, 3),
        (1, 100, 64, 500, 13),   # 8 batches an epoch (the last one partial): 13 epochs reach 104 >= 100 steps
        (1, 100, 32, 50, 50),    # 2 batches an epoch
        (1, 100, 64, 50, 100),   # one (partial) batch an epoch: one step each
        (1, 100, 64, 10_000, 1), # 157 batches: one epoch already passes the minimum
        (5, 10, 64, 500, 5),     # local-epochs is a floor too
        (0, 16, 8, 64, 2),       # exactly 16 steps
        (1, 100, 64, 0, 1),      # no rows: nothing to size
    ],
)
def test_local_epochs_for_reaches_at_least_local_min_steps(
    run_config_mapping: dict[str, Any], local_epochs: int, min_steps: int, batch: int, examples: int, expected: int
) -> None:
    # Prepare
    run_config_mapping.update({"local-epochs": local_epochs, "local-min-steps": min_steps, "teacher-batch-size": batch})
    cfg = RunConfig.from_run_config(run_config_mapping)

    # Execute
    epochs = cfg.local_epochs_for(examples)

    # Assert
    assert epochs == expected
    steps = epochs * math.ceil(examples / batch)
    assert examples == 0 or steps >= min_steps  # the minimum is met ...
    assert epochs == local_epochs or (epochs - 1) * math.ceil(examples / batch) < min_steps  # ... by the fewest epochs


def test_fedavg_epochs_follow_fedavg_settings_not_the_teachers(run_config_mapping: dict[str, Any]) -> None:
    # Prepare: teachers train 10 epochs in batches of 256; FedAvg 1 epoch in batches of 64, at least 40 steps
    run_config_mapping.update({"local-epochs": 10, "teacher-batch-size": 256, "fedavg-local-epochs": 1,
                               "fedavg-batch-size": 64, "local-min-steps": 40})
    cfg = RunConfig.from_run_config(run_config_mapping)

    # Execute
    fedavg, teacher = cfg.fedavg_epochs_for(640), cfg.local_epochs_for(640)

    # Assert: 640 rows are 10 batches of 64 (4 epochs reach 40 steps) and 3 batches of 256 (10 epochs are 30 steps: 14)
    assert (fedavg, teacher) == (4, 14)
    assert cfg.fedavg_epochs_for(0) == 1
