"""Unit tests of the across-seed report (simulations/seeds_report.py): comparison.md's tables and the two plots."""

from __future__ import annotations

from pathlib import Path

from simulations.compare import PER_ROUND_PLOT, UPLINK_PLOT
from simulations.seeds import summarise
from simulations.seeds_report import plot_seeds, seeds_table

from seed_fixtures import QUORUM, two_seeds

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HEADER = ("| method | seeds | student test accuracy | uplink per institution, total | uplink / FedAvg's | "
          "accuracy - FedAvg's | failed |\n|---|---:|---:|---:|---:|---:|---|\n")


def test_the_table_of_two_seeds() -> None:
    # Prepare
    summary = summarise(two_seeds(), [0, 1])

    # Execute
    text = seeds_table(summary)

    # Assert
    assert text == (
        "# Comparison over seeds: digits-iid\n\nseeds 0, 1\n\n"
        "## Mean ± standard deviation over seeds\n\n" + HEADER +
        "| mean | 2/2 | 0.6500 ± 0.0707 | 2.100 ± 0.141 MB | 0.233× | +10.00 points |  |\n"
        "| fedavg | 2/2 | 0.5500 ± 0.0707 | 9.000 ± 0.000 MB | 1× | +0.00 points |  |\n"
        "| local-only (mean of institutions) | 2/2 | 0.3500 ± 0.0707 |  |  |  |  |\n"
        "| centralised student (cnn-student) | 2/2 | 0.8500 ± 0.0707 |  |  |  |  |\n"
        "| centralised teacher (cnn-large) | 2/2 | 0.9000 ± 0.0707 |  |  |  |  |\n\n"
        "## Per seed (final student test accuracy)\n\n"
        "| method | seed 0 | seed 1 |\n|---|---:|---:|\n"
        "| mean | 0.6000 | 0.7000 |\n| fedavg | 0.5000 | 0.6000 |\n| local-only (mean of institutions) | 0.3000 | 0.4000 |\n"
        "| centralised student (cnn-student) | 0.8000 | 0.9000 |\n| centralised teacher (cnn-large) | 0.8500 | 0.9500 |\n\n"
        "## Frontier: mean accuracy against mean cumulative uplink per institution\n\n"
        "| method | uplink per institution, total | student test accuracy |\n|---|---:|---:|\n"
        "| mean | 2.100 MB | 0.6500 |\n\n"
        "dominated (another run has as much accuracy or more for as little uplink or less): fedavg\n\n"
        "### Frontier over every round\n\n"
        "Each run after each of its rounds (what stopping it there gives, exactly so when its settings do not depend on "
        "the number of rounds), the points no other dominates:\n\n"
        "| run | after round | uplink per institution, total | student test accuracy |\n|---|---:|---:|---:|\n"
        "| mean | 1 | 1.000 MB | 0.4500 |\n| mean | 2 | 2.100 MB | 0.6500 |\n"
    )


def test_failed_runs_and_seeds_and_the_seeds_still_to_run_are_in_the_table() -> None:
    # Prepare: mean fails on seed 1, seed 2 fails as a whole, seed 3 has not run yet
    done = two_seeds()
    done[1]["methods"]["mean"] = {"error": QUORUM}
    done[2] = {"error": "DataError: bad | partition"}

    # Execute
    text = seeds_table(summarise(done, [0, 1, 2, 3]))

    # Assert
    assert "\nseeds 0, 1, 2 (3 of 4; still to run: 3)\n" in text
    assert (f"| mean | 1/3 | 0.6000 | 2.000 MB | 0.222× | +5.00 points | seed 1: {QUORUM}; "
            "seed 2: DataError: bad \\| partition |\n") in text
    assert "| fedavg | 2/3 | 0.5500 ± 0.0707 | 9.000 ± 0.000 MB | 1× | +0.00 points | seed 2: DataError: bad \\| partition |\n" in text
    assert "\nseed 2 failed as a whole: DataError: bad \\| partition\n" in text
    assert "| method | seed 0 | seed 1 | seed 2 |\n|---|---:|---:|---:|\n| mean | 0.6000 | failed | failed |\n" in text


def test_with_every_method_failed_there_is_no_frontier() -> None:
    # Prepare
    done = two_seeds()
    for seed in done:
        done[seed]["methods"]["mean"] = {"error": QUORUM}
        done[seed]["baselines"]["fedavg"] = {"error": QUORUM}

    # Execute
    text = seeds_table(summarise(done, [0, 1]))

    # Assert
    assert "| mean | 0/2 |  |  |  |  | seed 0: " in text
    assert text.endswith("## Frontier: mean accuracy against mean cumulative uplink per institution\n\n"
                         "no method completed on any seed: no frontier\n")


def test_plots_of_two_seeds_are_written(tmp_path: Path) -> None:
    # Execute
    plot_seeds(summarise(two_seeds(), [0, 1]), tmp_path)

    # Assert
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([PER_ROUND_PLOT, UPLINK_PLOT])
    for name in (PER_ROUND_PLOT, UPLINK_PLOT):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000, name


def test_plots_are_written_with_one_seed_and_with_every_run_failed(tmp_path: Path) -> None:
    # Prepare
    failed = two_seeds()
    for seed in failed:
        failed[seed]["methods"]["mean"] = {"error": QUORUM}
        failed[seed]["baselines"]["fedavg"] = {"error": QUORUM}

    for name, summary in (("one", summarise({0: two_seeds()[0]}, [0])), ("failed", summarise(failed, [0, 1]))):
        folder = tmp_path / name
        folder.mkdir()

        # Execute
        plot_seeds(summary, folder)

        # Assert
        for plot in (PER_ROUND_PLOT, UPLINK_PLOT):
            assert (folder / plot).read_bytes().startswith(PNG_MAGIC), (name, plot)
