"""Unit tests of `fedstill compare`'s pure parts (simulations/compare.py): parsing the methods, the
rows and markdown table of a summary, and the two plots."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from common.config import RunConfig, default_run_config
from common.errors import ConfigError
from simulations import launcher
from simulations.compare import (
    PER_ROUND_PLOT,
    UPLINK_PLOT,
    Method,
    finished_run,
    markdown_table,
    parse_methods,
    plot_comparison,
    rows_of,
    run_comparison,
)

# ---------------------------------------------------------------------------------------------------
# parse_methods
# ---------------------------------------------------------------------------------------------------


def test_rules_split_on_commas_into_one_method_each() -> None:
    # Execute
    methods = parse_methods(["mean,era", "median"], [])

    # Assert
    assert methods == [
        Method("mean", {"aggregation": "mean"}),
        Method("era", {"aggregation": "era"}),
        Method("median", {"aggregation": "median"}),
    ]


def test_empty_rule_items_are_skipped() -> None:
    # Execute
    methods = parse_methods(["mean,,", ""], [])

    # Assert
    assert methods == [Method("mean", {"aggregation": "mean"})]


def test_spaces_around_rules_are_ignored() -> None:
    # Execute
    methods = parse_methods(["mean, era"], [])

    # Assert
    assert methods == [Method("mean", {"aggregation": "mean"}), Method("era", {"aggregation": "era"})]


def test_a_named_method_reads_its_values_as_toml() -> None:
    # Execute
    methods = parse_methods(
        [], ["era-fedmd:aggregation=era,digest-epochs=1,era-temperature=0.05,evaluate-teachers=false,run-name=\"x\""]
    )

    # Assert
    assert methods == [Method("era-fedmd", {
        "aggregation": "era", "digest-epochs": 1, "era-temperature": 0.05, "evaluate-teachers": False, "run-name": "x",
    })]
    values = methods[0].overrides
    assert type(values["digest-epochs"]) is int and type(values["era-temperature"]) is float


def test_quoted_values_keep_their_commas_and_spaces_are_trimmed() -> None:
    # Execute
    methods = parse_methods([], [' mixed : teacher-models = "cnn-small,cnn-large" , seed = 3'])

    # Assert
    assert methods == [Method("mixed", {"teacher-models": "cnn-small,cnn-large", "seed": 3})]


def test_site_keys_of_a_method_are_its_institutions_settings_not_run_config_keys() -> None:
    # Execute
    methods = parse_methods([], ["dp1:privacy=dp-sgd,site.max-epsilon=1,site.delta=1e-5,site.institution-2.class-counts=true",
                                 "plain:privacy=none"])

    # Assert
    assert methods == [
        Method("dp1", {"privacy": "dp-sgd"},
               {"max-epsilon": 1.0, "delta": 1e-5, "institutions": {"institution-2": {"class-counts": True}}}),
        Method("plain", {"privacy": "none"}),
    ]


def test_a_bad_site_key_of_a_method_is_a_config_error_naming_it() -> None:
    # Execute / Assert
    message = r"^--method 'dp1', a site.KEY=VALUE pair: --site 'budget=4': known institution settings are .*max-epsilon"
    with pytest.raises(ConfigError, match=message):
        parse_methods([], ["dp1:privacy=dp-sgd,site.budget=4"])


def test_each_method_runs_with_every_institutions_settings_and_its_own_on_top(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: every institution may release exact counts; the private method adds a budget, and a stricter one for
    # institution 1
    given: dict[str, Any] = {}

    def simulate(cfg: RunConfig, overrides: dict[str, Any], **options: Any) -> Any:
        given[overrides["run-name"]] = options["site"]
        raise ConfigError("not run in this test")

    monkeypatch.setattr(launcher, "simulate", simulate)
    methods = parse_methods([], ["plain:privacy=none", "dp1:privacy=dp-sgd,site.max-epsilon=1,site.institution-1.max-epsilon=0.5"])
    every = {"counts": "exact", "institutions": {"institution-1": {"delta": 1e-6}}}

    # Execute
    summary = run_comparison({"dataset": "digits"}, tmp_path / "cmp", methods, fedavg_rounds=1, with_baselines=False,
                             cpus_per_client=1, on_stage=lambda label, cfg: None, site=every)

    # Assert: the plain run and FedAvg get --site alone; the private run both, its institution 1 both of its own
    assert given == {
        "plain": every,
        "dp1": {"counts": "exact", "max-epsilon": 1.0,
                "institutions": {"institution-1": {"delta": 1e-6, "max-epsilon": 0.5}}},
        "fedavg": every,
    }
    assert every == {"counts": "exact", "institutions": {"institution-1": {"delta": 1e-6}}}  # not modified
    assert summary["methods"]["dp1"] == {"error": "ConfigError: not run in this test"}


def test_a_method_without_overrides_is_allowed() -> None:
    # Execute
    methods = parse_methods([], ["baseline:"])

    # Assert
    assert methods == [Method("baseline", {})]


def test_rules_come_before_named_methods() -> None:
    # Execute
    methods = parse_methods(["mean"], ["topk:codec=topk,codec-top-k=2"])

    # Assert
    assert [m.label for m in methods] == ["mean", "topk"]
    assert methods[1].overrides == {"codec": "topk", "codec-top-k": 2}


@pytest.mark.parametrize(
    ("rules", "methods"),
    [
        pytest.param(["mean,mean"], [], id="rule-twice"),
        pytest.param(["mean", "era,mean"], [], id="rule-in-two-items"),
        pytest.param(["era"], ["era:aggregation=era,codec=uint8"], id="rule-and-method"),
        pytest.param([], ["a:seed=1", "a:seed=2"], id="method-twice"),
    ],
)
def test_duplicate_labels_are_a_config_error(rules: list[str], methods: list[str]) -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match="method labels must be unique"):
        parse_methods(rules, methods)


@pytest.mark.parametrize("item", ["era", "aggregation=era", ":aggregation=era", "  :seed=1"])
def test_a_method_without_label_and_colon_is_a_config_error(item: str) -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match=r"--method expects label:key=value,key=value, got"):
        parse_methods([], [item])


def test_a_method_body_without_equals_sign_is_a_config_error() -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match="expects key=value, got 'digest-epochs'"):
        parse_methods([], ["x:digest-epochs"])


def test_a_comma_not_followed_by_a_key_stays_in_the_value() -> None:
    # Execute: unquoted model lists work too; a later pair starts only at `key=`
    methods = parse_methods([], ["x:teacher-models=cnn-small,cnn-large,seed=4"])

    # Assert
    assert methods == [Method("x", {"teacher-models": "cnn-small,cnn-large", "seed": 4})]


# ---------------------------------------------------------------------------------------------------
# rows_of and markdown_table on a summary shaped like what run_comparison writes
# ---------------------------------------------------------------------------------------------------


def round_row(round_: int, accuracy: float, replied: int, uplink: int) -> dict[str, Any]:
    """A results.json round row (the keys compare reads, and a few it ignores)."""
    return {"round": round_, "student_accuracy": accuracy, "clients_replied": replied, "uplink_bytes": uplink,
            "downlink_bytes": 5_000, "wall_s": 1.0, "ensemble_accuracy": None}


def make_summary() -> dict[str, Any]:
    return {
        "scenario": {"scenario": "digits-iid", "dataset": "digits", "num-clients": 3},
        "methods": {
            "mean": {
                "run_dir": "/tmp/cmp/mean",
                "rounds": [round_row(1, 0.50, 3, 3_000_000), round_row(2, 0.60, 2, 2_400_000)],
                "final": {"student_accuracy": 0.6, "teacher_accuracy_mean": 0.7},
            },
            "era": {"error": "QuorumError: round 1: 0 valid replies, min-clients is 2"},
            "topk": {
                "run_dir": "/tmp/cmp/topk",
                "rounds": [round_row(1, 0.40, 4, 120_000), round_row(2, 0.45, 4, 120_000), round_row(3, 0.5, 3, 60_000)],
                "final": {"student_accuracy": 0.5, "teacher_accuracy_mean": None},
            },
        },
        "baselines": {
            "fedavg": {
                "run_dir": "/tmp/cmp/fedavg",
                "rounds": [round_row(1, 0.30, 0, 0), round_row(2, 0.55, 3, 9_000_000)],
                "final": {"student_accuracy": 0.55, "teacher_accuracy_mean": None},
            },
            "local_only": {
                "epochs": 5, "accuracy_mean": 0.55, "accuracy_min": 0.5, "accuracy_max": 0.6, "wall_s": 1.0,
                "per_client": {"0": {"model": "cnn-small", "samples": 346, "accuracy": 0.5}},
            },
            "centralised": {
                "epochs": 5, "samples": 1037,
                "student": {"model": "cnn-student", "params": 13706, "accuracy": 0.8, "wall_s": 0.3},
                "teacher": {"model": "cnn-large", "params": 87178, "accuracy": 0.9, "wall_s": 1.0},
            },
        },
    }


def test_rows_hold_accuracy_rounds_and_uplink_per_client() -> None:
    # Prepare
    summary = json.loads(json.dumps(make_summary()))  # as read back from results.json

    # Execute
    rows = rows_of(summary)

    # Assert
    by_method = {row["method"]: row for row in rows}
    assert [row["method"] for row in rows] == [
        "mean", "era", "topk", "fedavg", "local-only (mean of institutions)",
        "centralised student (cnn-student)", "centralised teacher (cnn-large)",
    ]
    # mean: 3 MB / 3 clients + 2.4 MB / 2 clients
    assert by_method["mean"] == {"method": "mean", "accuracy": 0.6, "rounds": 2, "uplink_per_client_total": 2_200_000,
                                 "uplink_per_client_round": 1_200_000, "teachers": 0.7}
    assert by_method["era"] == {"method": "era", "error": "QuorumError: round 1: 0 valid replies, min-clients is 2"}
    # topk: 30 kB + 30 kB + 20 kB
    assert by_method["topk"]["uplink_per_client_total"] == pytest.approx(80_000)
    assert by_method["topk"]["uplink_per_client_round"] == pytest.approx(20_000)
    assert by_method["topk"]["rounds"] == 3
    # fedavg: a round with no replies counts 0 bytes, not a division by zero
    assert by_method["fedavg"]["uplink_per_client_total"] == 3_000_000
    assert by_method["fedavg"]["uplink_per_client_round"] == 3_000_000
    assert by_method["fedavg"]["teachers"] is None
    assert by_method["local-only (mean of institutions)"] == {
        "method": "local-only (mean of institutions)", "accuracy": 0.55, "note": "min 0.5000, max 0.6000, 5 epochs"}
    assert by_method["centralised teacher (cnn-large)"]["accuracy"] == 0.9
    assert by_method["centralised student (cnn-student)"]["note"] == "pooled private data, 5 epochs"


def test_markdown_table_lines() -> None:
    # Prepare
    summary = make_summary()

    # Execute
    table = markdown_table(summary)

    # Assert
    assert table == (
        "# Comparison: digits-iid\n\n"
        "| method | student test accuracy | rounds | uplink per client, total | per round | note |\n"
        "|---|---:|---:|---:|---:|---|\n"
        "| mean | 0.6000 | 2 | 2.200 MB | 1.200 MB | teachers' mean 0.7000 |\n"
        "| era | failed | | | | QuorumError: round 1: 0 valid replies, min-clients is 2 |\n"
        "| topk | 0.5000 | 3 | 0.080 MB | 0.020 MB |  |\n"
        "| fedavg | 0.5500 | 2 | 3.000 MB | 3.000 MB |  |\n"
        "| local-only (mean of institutions) | 0.5500 |  |  |  | min 0.5000, max 0.6000, 5 epochs |\n"
        "| centralised student (cnn-student) | 0.8000 |  |  |  | pooled private data, 5 epochs |\n"
        "| centralised teacher (cnn-large) | 0.9000 |  |  |  | pooled private data, 5 epochs |\n"
    )


def test_a_summary_of_failures_only_has_a_plain_header_and_failed_rows() -> None:
    # Prepare
    summary = {"scenario": None, "methods": {"mean": {"error": "ConfigError: bad run config"}},
               "baselines": {"fedavg": {"error": "QuorumError: FedAvg finished only 0 of 2 rounds"}}}

    # Execute
    rows, table = rows_of(summary), markdown_table(summary)

    # Assert
    assert rows == [{"method": "mean", "error": "ConfigError: bad run config"},
                    {"method": "fedavg", "error": "QuorumError: FedAvg finished only 0 of 2 rounds"}]
    assert table.startswith("# Comparison\n\n| method |")
    assert table.endswith(
        "| mean | failed | | | | ConfigError: bad run config |\n"
        "| fedavg | failed | | | | QuorumError: FedAvg finished only 0 of 2 rounds |\n"
    )


def test_rows_do_not_modify_the_summary() -> None:
    # Prepare
    summary = make_summary()
    original = copy.deepcopy(summary)

    # Execute
    rows_of(summary)
    markdown_table(summary)

    # Assert
    assert summary == original


# ---------------------------------------------------------------------------------------------------
# plot_comparison
# ---------------------------------------------------------------------------------------------------

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_plot_comparison_writes_both_plots(tmp_path: Path) -> None:
    # Prepare
    summary = make_summary()

    # Execute
    plot_comparison(summary, tmp_path)

    # Assert
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([PER_ROUND_PLOT, UPLINK_PLOT])
    for name in (PER_ROUND_PLOT, UPLINK_PLOT):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_MAGIC), name
        assert len(data) > 5_000, name


@pytest.mark.filterwarnings("ignore:No artists with labels found")
def test_plot_comparison_of_failures_only_still_writes_both_plots(tmp_path: Path) -> None:
    # Prepare
    summary = {"scenario": None, "methods": {"mean": {"error": "ConfigError: bad"}}, "baselines": {}}

    # Execute
    plot_comparison(summary, tmp_path)

    # Assert
    for name in (PER_ROUND_PLOT, UPLINK_PLOT):
        assert (tmp_path / name).read_bytes().startswith(PNG_MAGIC), name


# ---------------------------------------------------------------------------------------------------
# cached_baselines
# ---------------------------------------------------------------------------------------------------


def test_baselines_are_trained_once_per_folder_and_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: stand-ins count the trainings (the real ones take minutes; they have their own tests)
    from common.config import RunConfig, default_run_config
    from simulations import baselines, compare

    calls: list[str] = []
    monkeypatch.setattr(baselines, "local_only", lambda cfg: calls.append("local") or {"mean": 0.5})
    monkeypatch.setattr(baselines, "centralised", lambda cfg: calls.append("central") or {"student": {"accuracy": 0.9}})
    cfg = RunConfig.from_run_config({**default_run_config(), "dataset": "digits"})
    stages: list[str] = []

    # Execute: twice with the same settings, then with another alpha
    first = compare.cached_baselines(tmp_path, cfg, lambda label, _: stages.append(label))
    second = compare.cached_baselines(tmp_path, cfg, lambda label, _: stages.append(label))
    other = RunConfig.from_run_config({**default_run_config(), "dataset": "digits", "dirichlet-alpha": 0.1})
    compare.cached_baselines(tmp_path, other, lambda label, _: stages.append(label))

    # Assert
    assert first == second == {"local_only": {"mean": 0.5}, "centralised": {"student": {"accuracy": 0.9}}}
    assert calls == ["local", "central", "local", "central"]
    assert stages == ["local-only", "centralised", "local-only", "centralised"]
    assert json.loads((tmp_path / compare.BASELINES).read_text())["scenario"]["dirichlet-alpha"] == 0.1


def test_a_run_carried_out_with_another_window_or_timeout_is_the_same_run(tmp_path: Path) -> None:
    # Prepare: a completed run whose simulation kept 3 questions in flight, with a longer round-timeout
    cfg = RunConfig.from_run_config({**default_run_config(), "output-dir": str(tmp_path)})
    recorded = {**cfg.to_dict(), "max-in-flight": 3, "round-timeout": 900.0}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text(json.dumps({"status": "completed", "scenario": recorded}))

    # Execute
    same = finished_run(tmp_path / "run", cfg)
    other = finished_run(tmp_path / "run", RunConfig.from_run_config({**cfg.to_dict(), "temperature": 2.0}))

    # Assert: how a run is carried out does not make it another run; what it computes does
    assert same is not None and same["scenario"]["max-in-flight"] == 3
    assert other is None and (tmp_path / "run.previous-1" / "results.json").is_file()
