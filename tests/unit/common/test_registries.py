"""Unit tests of the two registries, common/tasks/registry.py and common/models/registry.py, and of the run
config's agreement with them: one registry, one answer."""

from __future__ import annotations

from typing import Any

import pytest

import common.config as config
from common.config import RunConfig
from common.errors import ConfigError, DataError
from common.models.registry import MODELS, build_model, models_for, unknown_model
from common.tasks.registry import DATASETS, dataset_spec, dataset_task, label_names, load_split, natural_datasets
from common.tasks.samples import TASKS
from common.tasks.tabular import SCHEMAS


def with_models(mapping: dict[str, Any], dataset: str, model: str) -> dict[str, Any]:
    """The run-config mapping with `dataset` and `model` as its only teacher and its student (a teacher-only model:
    as teacher, with the dataset's own student)."""
    student = "cnn-student" if model in MODELS and MODELS[model].teacher_only else model
    return {**mapping, "dataset": dataset, "teacher-models": model, "student-model": student}


# ---------------------------------------------------------------------------------------------------
# Data sets
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(DATASETS))
def test_every_dataset_spec_has_a_loader_label_names_and_a_known_task(name: str) -> None:
    # Prepare
    spec = DATASETS[name]

    # Assert
    assert spec.name == name
    assert callable(spec.loader)
    assert spec.task in TASKS
    assert len(spec.label_names) >= 2 and all(isinstance(n, str) and n for n in spec.label_names)
    assert len(set(spec.label_names)) == len(spec.label_names) == spec.num_classes
    assert label_names(name) == spec.label_names and dataset_task(name) == spec.task
    assert models_for(spec.task), f"no registered model fits {name}'s {spec.task} task"


def test_the_config_accepts_exactly_the_registered_datasets() -> None:
    # Assert
    assert config.DATASETS == tuple(DATASETS)
    assert config.NATURAL_DATASETS == natural_datasets()


def test_a_natural_dataset_is_a_table_whose_rows_name_their_institution() -> None:
    # Assert: the registry's flag agrees with the tabular schema that makes the groups
    for name, spec in DATASETS.items():
        assert spec.natural == (name in SCHEMAS and SCHEMAS[name].natural_id is not None)
        if name in SCHEMAS:
            assert spec.label_names == SCHEMAS[name].classes


def test_an_unknown_dataset_is_refused_by_the_registry_the_loader_and_the_config(
    run_config_mapping: dict[str, Any],
) -> None:
    # Prepare
    message = "unknown dataset 'cifar10'; use one of 'fashion-mnist', 'digits', 'covid-testing', 'credit-data', 'bbc-news'"

    # Execute / Assert
    with pytest.raises(DataError, match=f"^{message}$"):
        dataset_spec("cifar10")
    with pytest.raises(DataError, match=f"^{message}$"):
        load_split("cifar10", "", 10, 0)
    assert label_names("cifar10") == ()
    with pytest.raises(ConfigError, match="dataset must be one of"):
        RunConfig.from_run_config({**run_config_mapping, "dataset": "cifar10"})


# ---------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", list(MODELS))
def test_every_model_spec_names_a_builder_and_known_tasks(model: str) -> None:
    # Prepare
    spec = MODELS[model]

    # Assert
    assert spec.name == model
    assert callable(spec.build)
    assert spec.tasks and set(spec.tasks) <= set(TASKS)
    assert all(model in models_for(task) for task in spec.tasks)


@pytest.mark.parametrize("model", list(MODELS))
def test_the_config_accepts_a_model_for_exactly_its_declared_tasks(run_config_mapping: dict[str, Any], model: str) -> None:
    for dataset, spec in DATASETS.items():
        # Prepare
        mapping = with_models(run_config_mapping, dataset, model)

        # Execute / Assert
        if spec.task in MODELS[model].tasks:
            cfg = RunConfig.from_run_config(mapping)
            assert (cfg.teacher_model_list, cfg.student_model) == ([model], mapping["student-model"])
        else:
            with pytest.raises(ConfigError, match=rf"model '{model}' does not fit dataset {dataset} \({spec.task} task\)"):
                RunConfig.from_run_config(mapping)


def test_a_teacher_only_model_is_refused_as_the_student_with_the_fix(run_config_mapping: dict[str, Any]) -> None:
    # Prepare
    teacher_only = [name for name, spec in MODELS.items() if spec.teacher_only]

    # Execute / Assert
    assert teacher_only == ["scatter-pca", "scatter-pca-mlp"]
    with pytest.raises(ConfigError, match="student-model 'scatter-pca' is a teacher only.*such as cnn-student"):
        RunConfig.from_run_config({**run_config_mapping, "dataset": "fashion-mnist", "student-model": "scatter-pca"})


def test_an_unknown_model_is_refused_by_config_and_build_model_with_the_same_message(
    run_config_mapping: dict[str, Any],
) -> None:
    # Prepare
    message = unknown_model("resnet18")
    assert message.startswith("unknown model 'resnet18'; known models: bert-small, bert-tiny, cnn-large")

    # Execute
    with pytest.raises(ConfigError) as built:
        build_model("resnet18", 10, (28, 28))
    with pytest.raises(ConfigError) as configured:
        RunConfig.from_run_config(with_models(run_config_mapping, "fashion-mnist", "resnet18"))

    # Assert: build_model says exactly the message, the config says it among its problems (and no more about it)
    assert str(built.value) == message
    assert message in str(configured.value)
    assert "does not fit" not in str(configured.value)
