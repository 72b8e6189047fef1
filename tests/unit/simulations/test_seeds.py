"""Unit tests of `fedstill compare --seeds` (simulations/seeds.py): parsing and refusing seeds, the summary across
seeds (mean, sample std, failed runs and seeds, one seed), the frontier, and resumption from real run folders.

seed_runs/ holds the results of a real tiny comparison, saved as written by
`fedstill compare digits-tiny --seeds 0,1 --rules mean --fedavg-rounds 1` (each run's results.json and each seed's
baselines.json); the resumption tests place them in a new folder and run the comparison again."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from common.config import default_run_config
from common.errors import ConfigError
from simulations import baselines, launcher
from simulations.cli.main import app
from simulations.compare import PROVISIONED, TABLE, Method
from simulations.scenarios import to_toml
from simulations.seeds import (
    SUMMARY,
    check_folder_kind,
    frontier,
    parse_seeds,
    refuse_seed_settings,
    run_seeds,
    seed_folder,
    summarise,
)

from seed_fixtures import QUORUM, round_row, run, seed_summary, two_seeds

SAVED = Path(__file__).resolve().parent / "seed_runs"

# ---------------------------------------------------------------------------------------------------
# parse_seeds and the settings --seeds refuses
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seeds"),
    [
        pytest.param("0,1,2,3,4", [0, 1, 2, 3, 4], id="list"),
        pytest.param("0-4", [0, 1, 2, 3, 4], id="range"),
        pytest.param(" 7 , 0-2 ", [7, 0, 1, 2], id="mixed-in-given-order"),
        pytest.param("3-3", [3], id="one-seed-range"),
        pytest.param("42", [42], id="one-seed"),
    ],
)
def test_seeds_are_read_from_lists_and_ranges(text: str, seeds: list[int]) -> None:
    # Execute / Assert
    assert parse_seeds(text) == seeds


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("", "expects integers >= 0 or ranges", id="empty"),
        pytest.param("0,,1", "got '' in '0,,1'", id="empty-item"),
        pytest.param("-1", "got '-1'", id="negative"),
        pytest.param("a", "got 'a'", id="word"),
        pytest.param("1.5", "got '1.5'", id="float"),
        pytest.param("4-0", "range '4-0' runs backwards; write it 0-4", id="backwards"),
        pytest.param("0-2,2", "lists seed 2 more than once", id="duplicate"),
    ],
)
def test_bad_seeds_are_a_config_error(text: str, message: str) -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match=message):
        parse_seeds(text)


def test_a_seed_set_for_every_run_is_refused_naming_the_fix() -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match=r"^--seeds sets every run's seed: drop --set seed=3 \(or drop --seeds"):
        refuse_seed_settings({"seed": 3, "num-server-rounds": 2}, [Method("mean", {"aggregation": "mean"})])


def test_a_seed_set_by_one_method_is_refused_naming_the_method() -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match="drop seed=5 from --method fixed"):
        refuse_seed_settings({}, [Method("mean", {"aggregation": "mean"}), Method("fixed", {"seed": 5})])


def test_settings_without_a_seed_pass() -> None:
    # Execute / Assert: no error
    refuse_seed_settings({"dirichlet-alpha": 0.1}, [Method("mean", {"aggregation": "mean"})])


@pytest.mark.parametrize(("kept", "seeded"), [({"methods": {}}, True), ({"seeds": [0]}, False)])
def test_a_folder_of_the_other_kind_of_comparison_is_refused(tmp_path: Path, kept: dict[str, Any], seeded: bool) -> None:
    # Prepare
    (tmp_path / SUMMARY).write_text(json.dumps(kept))

    # Execute / Assert
    with pytest.raises(ConfigError, match=r"give this one its own folder \(--set run-name="):
        check_folder_kind(tmp_path, seeded=seeded)


@pytest.mark.parametrize(("kept", "seeded"), [(None, True), (None, False), ({"seeds": [0]}, True), ({"methods": {}}, False)])
def test_an_empty_folder_or_one_of_the_same_kind_is_accepted(tmp_path: Path, kept: dict[str, Any] | None, seeded: bool) -> None:
    # Prepare
    if kept is not None:
        (tmp_path / SUMMARY).write_text(json.dumps(kept))

    # Execute / Assert: no error
    check_folder_kind(tmp_path, seeded=seeded)


def test_compare_refuses_seeds_with_a_set_seed_in_one_line(tmp_path: Path) -> None:
    # Execute
    result = CliRunner().invoke(app, ["compare", "digits-tiny", "--seeds", "0,1", "--set", "seed=3",
                                      "--set", f"output-dir={tmp_path}"], env={"COLUMNS": "300"})

    # Assert
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "ConfigError: --seeds sets every run's seed: drop --set seed=3 (or drop --seeds to run one seed)"]
    assert list(tmp_path.iterdir()) == []


def test_compare_refuses_a_bad_seed_list_before_running_anything(tmp_path: Path) -> None:
    # Execute
    result = CliRunner().invoke(app, ["compare", "digits-tiny", "--seeds", "0,x", "--set", f"output-dir={tmp_path}"],
                                env={"COLUMNS": "300"})

    # Assert
    assert result.exit_code == 1
    assert "ConfigError: --seeds expects integers >= 0 or ranges" in result.output and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------
# summarise: one seed's comparison summaries (as run_comparison returns them) -> the summary across seeds
# ---------------------------------------------------------------------------------------------------


def test_the_summary_holds_mean_sample_std_and_every_seed() -> None:
    # Execute
    summary = summarise(two_seeds(), [0, 1])

    # Assert
    mean = summary["methods"]["mean"]
    assert mean["per_seed"] == {"0": {"accuracy": 0.6, "uplink_per_institution": 2_000_000, "rounds": 2},
                                "1": {"accuracy": 0.7, "uplink_per_institution": 2_200_000, "rounds": 2}}
    assert mean["seeds_completed"] == 2
    assert mean["accuracy_mean"] == pytest.approx(0.65)
    assert mean["accuracy_std"] == pytest.approx(0.1 / 2 ** 0.5)  # ddof=1: |a - b| / sqrt(2)
    assert mean["uplink_per_institution_mean"] == pytest.approx(2_100_000)
    assert mean["uplink_per_institution_std"] == pytest.approx(200_000 / 2 ** 0.5)
    assert mean["per_round"] == [
        {"round": 1, "seeds": 2, "accuracy_mean": pytest.approx(0.45), "accuracy_std": pytest.approx(0.1 / 2 ** 0.5),
         "uplink_per_institution_mean": pytest.approx(1_000_000)},
        {"round": 2, "seeds": 2, "accuracy_mean": pytest.approx(0.65), "accuracy_std": pytest.approx(0.1 / 2 ** 0.5),
         "uplink_per_institution_mean": pytest.approx(2_100_000)},
    ]
    assert list(summary["methods"]) == ["mean"]
    assert list(summary["baselines"]) == ["fedavg", "local-only (mean of institutions)",
                                          "centralised student (cnn-student)", "centralised teacher (cnn-large)"]
    local = summary["baselines"]["local-only (mean of institutions)"]
    assert local["per_seed"] == {"0": {"accuracy": 0.3}, "1": {"accuracy": 0.4}}
    assert local["accuracy_mean"] == pytest.approx(0.35) and "uplink_per_institution_mean" not in local
    assert summary["baselines"]["fedavg"]["uplink_per_institution_mean"] == pytest.approx(9_000_000)
    assert summary["seeds"] == summary["seeds_run"] == [0, 1] and summary["seed_errors"] == {}
    assert summary["scenario"] == {"scenario": "digits-iid"}  # the seed varies: it is in seeds


def test_the_std_is_numpys_sample_std_over_five_seeds() -> None:
    # Prepare
    accuracies = [0.61, 0.64, 0.58, 0.70, 0.66]
    done = {seed: seed_summary(seed, run(round_row(1, acc, 3, 300)), run(round_row(1, 0.5, 3, 900)), 0.3, 0.8)
            for seed, acc in enumerate(accuracies)}

    # Execute
    mean = summarise(done, list(range(5)))["methods"]["mean"]

    # Assert
    assert mean["accuracy_mean"] == pytest.approx(statistics.fmean(accuracies))
    assert mean["accuracy_std"] == pytest.approx(0.04604345773288536, abs=1e-12)  # numpy.std(ddof=1)


def test_a_method_that_failed_on_one_seed_keeps_its_error_and_its_mean_over_the_others() -> None:
    # Prepare
    done = two_seeds()
    done[1]["methods"]["mean"] = {"error": QUORUM}

    # Execute
    mean = summarise(done, [0, 1])["methods"]["mean"]

    # Assert
    assert mean["per_seed"]["1"] == {"error": QUORUM}
    assert mean["seeds_completed"] == 1
    assert mean["accuracy_mean"] == 0.6 and mean["accuracy_std"] is None
    assert [row["seeds"] for row in mean["per_round"]] == [1, 1]


def test_a_method_that_failed_on_every_seed_is_still_reported() -> None:
    # Prepare
    done = two_seeds()
    for seed in done:
        done[seed]["methods"]["mean"] = {"error": QUORUM}

    # Execute
    summary = summarise(done, [0, 1])

    # Assert
    mean = summary["methods"]["mean"]
    assert mean["seeds_completed"] == 0 and mean["accuracy_mean"] is None and mean["per_round"] == []
    assert summary["frontier"] == ["fedavg"]


def test_a_seed_that_failed_as_a_whole_is_an_error_of_each_run_on_that_seed() -> None:
    # Prepare
    done = two_seeds()
    done[1] = {"error": "DataError: dirichlet partitioning of 1437 samples into 3 parts failed"}

    # Execute
    summary = summarise(done, [0, 1, 2])

    # Assert
    assert summary["seed_errors"] == {"1": "DataError: dirichlet partitioning of 1437 samples into 3 parts failed"}
    for entry in [*summary["methods"].values(), *summary["baselines"].values()]:
        assert entry["per_seed"]["1"] == {"error": summary["seed_errors"]["1"]}
        assert entry["seeds_completed"] == 1
    assert summary["seeds"] == [0, 1, 2] and summary["seeds_run"] == [0, 1]


def test_one_seed_has_no_std() -> None:
    # Execute
    summary = summarise({0: two_seeds()[0]}, [0])

    # Assert
    for entry in [*summary["methods"].values(), *summary["baselines"].values()]:
        assert entry["seeds_completed"] == 1 and entry["accuracy_std"] is None
    assert summary["methods"]["mean"]["uplink_per_institution_std"] is None
    assert summary["methods"]["mean"]["per_round"][0]["accuracy_std"] is None


# ---------------------------------------------------------------------------------------------------
# the frontier and the comparison with FedAvg
# ---------------------------------------------------------------------------------------------------


def test_dominated_points_leave_the_frontier_and_the_rest_is_sorted_by_uplink() -> None:
    # Prepare: (uplink, accuracy)
    points = {"fedavg": (9e6, 0.80), "topk": (1e5, 0.70), "mean": (2e6, 0.78), "era": (2e6, 0.75), "bad": (3e6, 0.70),
              "same-accuracy-more-bytes": (2e5, 0.70)}

    # Execute / Assert: era has mean's uplink for less accuracy; bad and same-accuracy-more-bytes are beaten by topk
    assert frontier(points) == ["topk", "mean", "fedavg"]


def test_equal_points_both_stay_on_the_frontier() -> None:
    # Execute / Assert
    assert frontier({"a": (1e6, 0.7), "b": (1e6, 0.7), "c": (5e5, 0.6)}) == ["c", "a", "b"]


def test_one_point_is_its_own_frontier_and_none_gives_none() -> None:
    # Execute / Assert
    assert frontier({"mean": (1.0, 0.5)}) == ["mean"]
    assert frontier({}) == []


def test_the_summary_places_each_run_against_fedavg() -> None:
    # Execute
    summary = summarise(two_seeds(), [0, 1])

    # Assert: mean 0.65 for 2.1 MB, FedAvg 0.55 for 9 MB
    assert summary["frontier"] == ["mean"]
    assert summary["versus_fedavg"]["mean"] == {"uplink_ratio": pytest.approx(2.1 / 9), "accuracy_points": pytest.approx(10.0)}
    assert summary["versus_fedavg"]["fedavg"] == {"uplink_ratio": 1.0, "accuracy_points": 0.0}
    assert set(summary["versus_fedavg"]) == {"mean", "fedavg"}  # the baselines have no uplink


def test_the_frontier_over_every_round_keeps_early_rounds_that_no_final_point_beats() -> None:
    # Execute: mean after round 1: 0.45 for 1 MB, after round 2: 0.65 for 2.1 MB; FedAvg's one round 0.55 for 9 MB
    summary = summarise(two_seeds(), [0, 1])

    # Assert: mean's first round is a point of its own; FedAvg is beaten by mean's second
    assert summary["round_frontier"] == [
        {"run": "mean", "round": 1, "uplink_per_institution_mean": pytest.approx(1_000_000), "accuracy_mean": pytest.approx(0.45)},
        {"run": "mean", "round": 2, "uplink_per_institution_mean": pytest.approx(2_100_000), "accuracy_mean": pytest.approx(0.65)},
    ]


def test_without_fedavg_there_is_no_comparison_with_it() -> None:
    # Prepare
    done = two_seeds()
    for seed in done:
        del done[seed]["baselines"]["fedavg"]

    # Execute
    summary = summarise(done, [0, 1])

    # Assert
    assert summary["versus_fedavg"] == {} and summary["frontier"] == ["mean"]


# ---------------------------------------------------------------------------------------------------
# resumption, from the saved results of a real tiny comparison
# ---------------------------------------------------------------------------------------------------


def saved_scenario() -> dict[str, Any]:
    """The settings the saved comparison ran under, as the run-config keys a comparison is given (its `base`)."""
    recorded = json.loads((SAVED / "seed-0" / "mean" / "results.json").read_text())["scenario"]
    dropped = {"output-dir", "run-name", "seed", *PROVISIONED}
    return {key: value for key, value in recorded.items() if key in default_run_config() and key not in dropped}


def place_saved(folder: Path) -> None:
    """The saved seed folders copied into `folder`, each run's output-dir made its new seed folder (as the comparison
    that wrote them there would have recorded it)."""
    shutil.copytree(SAVED, folder)
    for results in folder.glob("seed-*/*/results.json"):
        kept = json.loads(results.read_text())
        kept["scenario"]["output-dir"] = str(results.parent.parent)
        results.write_text(json.dumps(kept))


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run or baseline started again fails the test at once (a real one would start Flower and train)."""
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a completed run was started again")

    for module, name in ((launcher, "simulate"), (baselines, "local_only"), (baselines, "centralised")):
        monkeypatch.setattr(module, name, refuse)


def test_completed_seeds_are_not_run_again_and_their_results_are_summarised(tmp_path: Path, no_training: None) -> None:
    # Prepare
    folder = tmp_path / "compare-resumed"
    place_saved(folder)
    saved = {seed: {label: json.loads((folder / f"seed-{seed}" / label / "results.json").read_text())
                    for label in ("mean", "fedavg")} for seed in (0, 1)}
    stages: list[str] = []

    # Execute
    summary = run_seeds(saved_scenario(), folder, [Method("mean", {"aggregation": "mean"})], [0, 1], fedavg_rounds=1,
                        with_baselines=True, cpus_per_client=1, on_stage=lambda label, cfg: stages.append(label))

    # Assert: nothing ran, nothing was moved aside, and the summary is the saved runs'
    assert stages == []
    assert sorted(p.name for p in (folder / "seed-0").iterdir() if p.is_dir()) == ["fedavg", "mean"]
    accuracies = [saved[seed]["mean"]["final"]["student_accuracy"] for seed in (0, 1)]
    mean = summary["methods"]["mean"]
    assert [mean["per_seed"][str(seed)]["accuracy"] for seed in (0, 1)] == accuracies
    assert mean["accuracy_mean"] == pytest.approx(statistics.fmean(accuracies))
    assert mean["accuracy_std"] == pytest.approx(statistics.stdev(accuracies))
    assert summary["baselines"]["fedavg"]["per_seed"]["1"]["rounds"] == 1
    assert json.loads((folder / SUMMARY).read_text()) == json.loads(json.dumps(summary))
    for seed in (0, 1):  # each seed's own comparison, as a comparison without --seeds writes it
        assert json.loads((seed_folder(folder, seed) / SUMMARY).read_text())["methods"]["mean"]["final"] == \
            saved[seed]["mean"]["final"]
        assert (seed_folder(folder, seed) / TABLE).is_file()


def test_compare_with_seeds_goes_on_from_a_complete_folder_and_prints_the_summary(tmp_path: Path, no_training: None) -> None:
    # Prepare: the same settings as the saved comparison, from a scenario file
    scenario = tmp_path / "saved.toml"
    scenario.write_text(to_toml(saved_scenario()))
    place_saved(tmp_path / "runs" / "compare-resumed")

    # Execute
    result = CliRunner().invoke(app, ["compare", str(scenario), "--rules", "mean", "--fedavg-rounds", "1", "--seeds", "0-1",
                                      "--set", f"output-dir={tmp_path / 'runs'}", "--set", 'run-name="resumed"'],
                                env={"COLUMNS": "300"})

    # Assert
    assert result.exit_code == 0, result.output
    assert "seeds 0, 1 ->" in result.output and "# Comparison over seeds: digits-tiny" in result.output
    summary = json.loads((tmp_path / "runs" / "compare-resumed" / SUMMARY).read_text())
    assert summary["seeds"] == [0, 1] and summary["methods"]["mean"]["seeds_completed"] == 2


def test_the_command_names_each_failed_run_with_its_seeds_and_each_failed_seed() -> None:
    # Prepare
    from simulations.cli.run_commands import compare_failures

    done = two_seeds()
    done[1]["methods"]["mean"] = {"error": QUORUM}
    done[2] = {"error": "DataError: bad partition"}

    # Execute
    failed = compare_failures(summarise(done, [0, 1, 2]))

    # Assert
    assert failed == ["mean (seed 1, 2)", "fedavg (seed 2)", "local-only (mean of institutions) (seed 2)",
                      "centralised student (cnn-student) (seed 2)", "centralised teacher (cnn-large) (seed 2)", "seed 2"]
    assert compare_failures(summarise(two_seeds(), [0, 1])) == []
