"""Unit tests of `fedstill evaluate` (simulations/student/evaluate.py, simulations/student/reference_teachers.py) and a smoke run
of `fedstill bench` (simulations/student/bench.py; not timed) on a tiny digits run folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import RecordDict
from safetensors.torch import load_file

from client.site import Site
from client.teacher import attach_store, restore_teacher, save_teacher, teacher_store, train_round
from common.errors import ConfigError
from common.models.inputs import images_to_tensor
from common.node_config import NodeConfig
from common.tasks.partition import partition_rows
from common.tasks.registry import load_split
from common.tasks.samples import public_fingerprint
from simulations.student.bench import bench_run, reference_teacher
from simulations.student.evaluate import EVAL_DIR, PLOT, REPORT, SUMMARY, EnsembleLogits, evaluate_run
from simulations.student.load import load_run_split, load_run_student, softmax, torch_logits
from simulations.student.reference_teachers import CACHE, reference_ensemble, train_teachers

from run_fixtures import TINY_RUN, make_run_folder, tiny_cfg

TINY_TEACHERS = str(TINY_RUN["teacher-models"])


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run_folder(tmp_path_factory.mktemp("eval") / "run")


def test_evaluate_writes_every_figure_without_teachers(run: Path) -> None:
    # Prepare
    student = load_run_student(run)

    # Execute
    summary = evaluate_run(student, levels={"gaussian": [0.0, 0.3], "fgsm": [0.0, 0.1]}, bins=10)

    # Assert
    out = run / EVAL_DIR
    assert json.loads((out / SUMMARY).read_text()) == json.loads(json.dumps(summary))
    assert (out / PLOT).stat().st_size > 0
    assert "| ECE (10 equal-width bins) |" in (out / REPORT).read_text()
    assert 0.5 < summary["accuracy"] <= 1 and 0 < summary["macro_f1"] <= 1 and 0 <= summary["ece"] <= 1
    assert summary["retention"]["source"] is None and "--with-teachers" in summary["retention"]["note"]
    curves = summary["robustness"]["curves"]
    gaussian, attack = curves["gaussian"]["points"], curves["fgsm"]["points"]
    assert [point["level"] for point in gaussian] == [0.0, 0.3]
    assert gaussian[0]["accuracy"] == attack[0]["accuracy"] == summary["accuracy"]
    assert attack[1]["accuracy"] < attack[0]["accuracy"]
    assert summary["size"]["params"] == sum(p.numel() for p in student.model.parameters())
    results = json.loads((run / "results.json").read_text())
    assert results["evaluation"] == json.loads(json.dumps(summary)) and results["status"] == "completed"
    page = (run / "report.md").read_text()
    assert "## Evaluation" in page and f"| macro-F1 | {summary['macro_f1']:.4f} |" in page
    assert "evaluation/robustness.png" in page


def test_retention_of_a_student_identical_to_its_ensemble_is_zero_divergence(run: Path) -> None:
    # Prepare: an "ensemble" that answers exactly what the student answers
    student = load_run_student(run)
    split = load_split("digits", "", 400, 42)
    logits = torch_logits(student.model, images_to_tensor(split.test.images))
    ensemble = EnsembleLogits(lambda t: softmax(logits / t), "the student itself (test)")

    # Execute
    retention = evaluate_run(student, ensemble=ensemble, levels={"gaussian": [0.0], "fgsm": [0.0]})["retention"]

    # Assert
    assert retention["js_divergence_bits"] == pytest.approx(0.0, abs=1e-12)
    assert retention["js_divergence_bits_at_distillation_temperature"] == pytest.approx(0.0, abs=1e-12)
    assert retention["top1_agreement"] == 1.0
    assert retention["source"] == "the student itself (test)"


@pytest.mark.parametrize("teachers", ["cnn-small,mlp", "cnn-small,mlp-deep"])  # mlp-deep: dropout 0.1
def test_retrained_teacher_is_the_clients_teacher(teachers: str) -> None:
    # Prepare: the client's own training of partition 1, round by round (client.teacher), with another
    # teacher's training in the same process in between, as a simulation worker serves several institutions
    cfg = tiny_cfg(**{"teacher-models": teachers})
    split = load_split(cfg.dataset, cfg.data_dir, cfg.public_size, cfg.seed, cfg.test_size)
    site = Site(1, split.private.subset(partition_rows(split, cfg, 1)), split.public, split.test,
                public_fingerprint(split.public))
    state = RecordDict()
    for _ in range(cfg.num_server_rounds):
        client_model, rounds_trained = restore_teacher(state, cfg, site)
        train_round(client_model, cfg, site, rounds_trained)
        save_teacher(state, client_model, cfg, site, rounds_trained + 1)
        torch.rand(1000)  # other work in the worker moves torch's random state

    # Execute
    replayed = train_teachers(cfg, split)[1]

    # Assert
    assert replayed["model"] == cfg.teacher_model_for(1)
    np.testing.assert_allclose(replayed["logits"], torch_logits(client_model, images_to_tensor(split.test.images)),
                               atol=1e-5)


def test_retrained_ensemble_is_cached_and_aggregated_with_the_runs_rule(run: Path) -> None:
    # Prepare
    student = load_run_student(run)

    # Execute
    first = reference_ensemble(student)
    second = reference_ensemble(student)

    # Assert
    assert (run / EVAL_DIR / CACHE).is_file()
    assert not first.details["cached"] and second.details["cached"]
    np.testing.assert_array_equal(first.probs_at(1.0), second.probs_at(1.0))
    np.testing.assert_allclose(first.probs_at(3.0).sum(axis=1), 1.0, rtol=1e-6)
    assert [t["model"] for t in first.details["teachers"]] == ["cnn-small", "mlp"]
    assert "retrained locally" in first.source and not first.details["stored"]
    assert first.details["notes"] == [f"retrained because the run's own teachers are not usable: no saved cnn-small "
                                      f"teacher of institution 0 in {run / 'sites'}"]


def keep_teachers(run: Path, teacher_models: str) -> None:
    """Each institution trains and keeps its teacher in the run's sites folder, as in a simulation."""
    cfg = tiny_cfg(**{"teacher-models": teacher_models})
    split = load_split(cfg.dataset, cfg.data_dir, cfg.public_size, cfg.seed, cfg.test_size)
    for pid in range(cfg.num_clients):
        site = Site(pid, split.private.subset(partition_rows(split, cfg, pid)), split.public, split.test,
                    public_fingerprint(split.public))
        state = RecordDict()
        attach_store(state, teacher_store(cfg, site, NodeConfig(state_dir=str(run / "sites" / f"institution-{pid}")), 7))
        for _ in range(cfg.num_server_rounds):
            model, rounds_trained = restore_teacher(state, cfg, site)
            train_round(model, cfg, site, rounds_trained)
            save_teacher(state, model, cfg, site, rounds_trained + 1)


def test_a_simulated_runs_own_teachers_are_used_and_the_replay_matches_them(tmp_path: Path) -> None:
    # Prepare
    run = make_run_folder(tmp_path / "run", epochs=1, **{"teacher-models": "cnn-small,mlp-deep"})
    keep_teachers(run, "cnn-small,mlp-deep")

    # Execute
    stored = reference_ensemble(load_run_student(run))
    replayed = reference_ensemble(load_run_student(run), retrain=True)

    # Assert
    assert stored.details["stored"] and "final teachers, read from the institutions' state folders" in stored.source
    assert not replayed.details["stored"]
    np.testing.assert_allclose(stored.probs_at(1.0), replayed.probs_at(1.0), atol=1e-5)


def test_a_fedavg_run_has_no_teacher_ensemble(tmp_path: Path) -> None:
    student = load_run_student(make_run_folder(tmp_path / "fedavg", epochs=1, method="fedavg"))

    with pytest.raises(ConfigError, match="is a 'fedavg' run: it has no teacher ensemble"):
        reference_ensemble(student)


def test_bench_times_teacher_and_student_in_each_engine(run: Path) -> None:
    # Execute (a smoke run: two calls per cell, figures not checked for speed)
    result = bench_run(run, iterations=2, rounds=1, warmup=1)

    # Assert: six engines, the teacher in PyTorch first (the reference of `throughput_x_teacher`, as before)
    engines = result["engines"]
    assert list(engines) == [f"{role}, {engine}" for role in ("teacher", "student")
                             for engine in ("PyTorch", "ORT FP32", "ORT INT8")]
    assert result["threads"] == 1 and result["teacher"]["model"] == "cnn-small"  # larger than mlp on 8x8 digits
    assert engines["teacher, PyTorch"]["1"]["throughput_x_teacher"] == 1.0
    assert all(set(by_batch) == {"1", "64"} and by_batch["64"]["calls"] == 2 for by_batch in engines.values())
    # the teacher exported as the student is: FP32 and INT8 files, parity with PyTorch; weights fresh (no sites/)
    teacher = result["teacher"]
    assert set(teacher["files"]) == {"cnn-small.onnx", "cnn-small.int8.onnx"} and teacher["int8_mode"] == "static"
    assert all(Path(entry["path"]).is_file() for entry in teacher["files"].values())
    assert teacher["parity_fp32"]["argmax_agreement"] == 1.0 and teacher["weights"].startswith("built fresh")
    # the student against the teacher within each engine, and INT8 or FP32 from this run's own timings
    assert list(result["per_engine"]) == ["PyTorch", "ORT FP32", "ORT INT8"]
    for engine, by_batch in result["per_engine"].items():
        assert by_batch["64"]["student_x_teacher"] == (engines[f"student, {engine}"]["64"]["throughput"]
                                                      / engines[f"teacher, {engine}"]["64"]["throughput"])
    faster = all(engines["student, ORT INT8"][b]["throughput"] > engines["student, ORT FP32"][b]["throughput"] for b in ("1", "64"))
    drop = result["int8"]["accuracy_drop_points"]
    assert result["int8"]["precision"] == ("int8" if faster and drop <= 1 else "fp32")
    results = json.loads((run / "results.json").read_text())
    assert results["serving"]["engines"] == engines and results["export"]["accuracy"]["onnx_int8"] > 0
    page = (run / "report.md").read_text()
    assert "## Serving" in page and "| student, ORT INT8 | 64 |" in page and "## Export" in page
    assert "Student against teacher in the same engine:" in page and "| ORT INT8 | 64 | " in page
    assert f"Ship **{result['int8']['precision'].upper()}**" in page


def test_bench_times_the_runs_own_largest_teacher_where_an_institution_kept_it(tmp_path: Path) -> None:
    # Prepare: institution 0 trains cnn-small (the larger), institution 1 mlp
    run = make_run_folder(tmp_path / "run", epochs=1)
    keep_teachers(run, TINY_TEACHERS)
    student = load_run_student(run)

    # Execute
    name, model, weights = reference_teacher(student, load_run_split(student))

    # Assert: institution 0's final weights, named with their file
    saved = sorted((run / "sites" / "institution-0").glob("teacher-*.safetensors"))
    assert name == "cnn-small" and weights == f"institution 0's teacher after 2 round(s), {saved[-1]}"
    for key, value in load_file(str(saved[-1])).items():
        torch.testing.assert_close(model.state_dict()[key], value)
