"""One round's compute in one process, with no framework, timed per phase beside a run's own profile.

    .venv/bin/python scripts/profile_round.py --run runs/X [--workers N]
    .venv/bin/python scripts/profile_round.py [SCENARIO] [--set key=value ...]

Round 1 of the run's scenario (its results.json `scenario`; without --run, SCENARIO or the defaults), done as the
apps do it but with no Flower runtime and no Ray (their modules are imported, nothing of them runs): each
institution loads its partition and a fresh teacher (client.site.load_site, client.teacher.restore_teacher), trains
it one round (client.teacher.train_round), saves it back into node state and a teacher file, as a simulated
institution does, and labels the queried public samples (common.models.training.predict_probs), with the run's
`torch-threads`; the soft labels go through the run's codec (untimed); the server aggregates them
(common.aggregation), distils the student (server.distill.Student) and evaluates it, with torch's default threads,
as the ServerApp does. Nothing is signed, checked, logged nor checkpointed: those are the federation's.

The institutions run one after another here; in a simulation they share the machine's workers (`--workers`,
default the CPUs Ray sees: one client per CPU), so the in-process round on W workers is the longest worker's
share of the institutions (largest first, each to the least loaded worker) plus the server's compute. The
framework overhead is the run's round time (phases.round_s: query to end of checkpoint) less that, as a share of
the round. Timings on a shared machine are noisy: compare figures of one run of this script.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import RecordDict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from client.site import Site, load_site  # noqa: E402
from client.teacher import attach_store, restore_teacher, save_teacher, teacher_store, train_round  # noqa: E402
from common.aggregation import NEEDS_CLASS_COUNTS, AggregationParams, aggregate  # noqa: E402
from common.codecs import encode  # noqa: E402
from common.config import RunConfig, default_run_config  # noqa: E402
from common.messages import SoftLabelQuery, validate_soft_labels  # noqa: E402
from common.models.inputs import input_shape  # noqa: E402
from common.models.training import predict_probs  # noqa: E402
from common.node_config import NodeConfig  # noqa: E402
from common.tasks.registry import load_split  # noqa: E402
from common.tasks.samples import FederatedSplit, public_fingerprint  # noqa: E402
from server.distill import Student, ensemble_accuracy, target_temperature  # noqa: E402
from server.results.run_folder import RESULTS  # noqa: E402
from server.results.schema import RoundPhases, RoundRow  # noqa: E402
from server.rounds import make_query  # noqa: E402
from simulations.scenarios import resolve  # noqa: E402

NODE = ("load", "train", "label")
SERVER = ("aggregate", "distil", "evaluate")


@dataclass
class Institution:
    """One institution's answer: its seconds per phase, and what the server needs of it."""

    seconds: dict[str, float] = field(default_factory=dict)
    probs: np.ndarray | None = None  # (m, C) float32 as the server decodes them
    num_examples: int = 0
    class_counts: np.ndarray | None = None

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


@contextmanager
def timed(seconds: dict[str, float], name: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - started


def answer(cfg: RunConfig, pid: int, query: SoftLabelQuery, state_dir: Path) -> Institution:
    """What institution `pid`'s ClientApp computes for round 1's query, timed."""
    done, state = Institution(), RecordDict()  # node state: a plain record, as Flower hands it over
    node = NodeConfig.from_node_config({"partition-id": pid, "num-partitions": cfg.num_clients,
                                        "state-dir": str(state_dir / f"institution-{pid}")})
    with timed(done.seconds, "load"):
        site: Site = load_site(cfg, node, state)
        attach_store(state, teacher_store(cfg, site, node, run_id=1))
        teacher, rounds_trained = restore_teacher(state, cfg, site)
    with timed(done.seconds, "train"):
        train_round(teacher, cfg, site, rounds_trained)
    with timed(done.seconds, "load"):
        save_teacher(state, teacher, cfg, site, rounds_trained + 1)
    with timed(done.seconds, "label"):
        probs = predict_probs(teacher, site.public.inputs[query.sample_ids], query.temperature)
    done.probs = validate_soft_labels(encode(probs, query.codec, query.top_k), query)  # the codec's round trip
    done.num_examples = len(site.private)
    done.class_counts = np.bincount(site.private.labels, minlength=site.private.num_classes).astype(np.int64)
    return done


def server_round(cfg: RunConfig, split: FederatedSplit, query: SoftLabelQuery,
                 answers: list[Institution]) -> tuple[dict[str, float], float]:
    """The server's compute of round 1 (aggregate, distil, evaluate), timed; and the student's test accuracy."""
    public, seconds = split.public, {}
    student = Student(cfg, public.num_classes, input_shape(public.inputs))
    params = AggregationParams(cfg.era_temperature, cfg.trim_fraction, cfg.selective_threshold, query.temperature,
                               cfg.weight_clip)
    counts = [a.class_counts for a in answers] if cfg.aggregation in NEEDS_CLASS_COUNTS else None
    with timed(seconds, "aggregate"):
        ensemble = aggregate(cfg.aggregation, [a.probs for a in answers if a.probs is not None],
                             [a.num_examples for a in answers], class_counts=counts, params=params)
    kept = query.sample_ids[ensemble.keep]
    with timed(seconds, "distil"):
        student.distil(public, kept, ensemble.probs[ensemble.keep], 1,
                      target_temperature(query.codec, query.temperature))
    with timed(seconds, "evaluate"):
        accuracy = student.evaluate(split.test)["accuracy"]
        ensemble_accuracy(ensemble.probs, public.labels[query.sample_ids])
    return seconds, accuracy


def makespan(times: list[float], workers: int) -> float:
    """The longest worker's share when `times` go, largest first, each to the least loaded of `workers`."""
    loads = [0.0] * max(1, workers)
    for seconds in sorted(times, reverse=True):
        loads[loads.index(min(loads))] += seconds
    return max(loads)


def run_config(args: argparse.Namespace) -> tuple[RunConfig, list[RoundRow]]:
    """The run's config and rows (with --run), else the scenario's config and no rows."""
    if args.run is None:
        return resolve(args.scenario, args.set, Path.cwd())[1], []
    results = json.loads((Path(args.run) / RESULTS).read_text(encoding="utf-8"))
    defaults = default_run_config()
    scenario = {k: v for k, v in results["scenario"].items() if k in defaults}
    return RunConfig.from_run_config({**defaults, **scenario}), [RoundRow.from_json(r) for r in results["rounds"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", nargs="?", default=None, help="scenario name or .toml (without --run)")
    parser.add_argument("--run", type=Path, help="a run folder: its scenario, and its rounds' phases beside")
    parser.add_argument("--set", action="append", default=[], help="a run-config key=value (without --run)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel institutions in the run")
    args = parser.parse_args()
    cfg, rows = run_config(args)
    cfg = replace(cfg, sites_dir="", allow_list="")  # the partitions of the pool, nothing signed
    server_threads = torch.get_num_threads()
    split = load_split(cfg.dataset, cfg.data_dir, cfg.public_size, cfg.seed, cfg.test_size, max_seq_len=cfg.max_seq_len)
    query = make_query(cfg, 1, public_fingerprint(split.public), len(split.public), split.public.num_classes)
    torch.set_num_threads(cfg.torch_threads)
    with tempfile.TemporaryDirectory(prefix="profile-round-") as state_dir:
        answers = [answer(cfg, pid, query, Path(state_dir)) for pid in range(cfg.num_clients)]
    torch.set_num_threads(server_threads)
    server, accuracy = server_round(cfg, split, query, answers)
    report(cfg, answers, server, accuracy, rows, min(args.workers, cfg.num_clients))


def report(cfg: RunConfig, answers: list[Institution], server: dict[str, float], accuracy: float, rows: list[RoundRow],
           workers: int) -> None:
    profiled = [r.phases for r in rows if r.phases is not None]
    first = profiled[0] if profiled else None
    mean: Callable[[str], float | None] = lambda name: _mean([getattr(p, name) for p in profiled])  # noqa: E731
    print(f"{cfg.scenario}: {cfg.num_clients} institutions, round 1 in one process (teachers {cfg.torch_threads} thread(s), "
          f"server {torch.get_num_threads()})")
    print("seconds; the run's node rows are its slowest node's (results.json rounds[].phases)")
    print(f"{'phase':<22}{'in-process: sum':>17}{'slowest inst.':>15}{'run: round 1':>14}{'run: mean':>11}")
    for name in NODE:
        values = [a.seconds.get(name, 0.0) for a in answers]
        print(_row(f"node {name}", sum(values), max(values), _get(first, name), mean(name)))
    totals = [a.total for a in answers]
    print(_row("node total", sum(totals), max(totals), _get(first, "node_total"), mean("node_total")))
    print(_row("nodes busy (summed)", sum(totals), None, _get(first, "node_busy"), mean("node_busy")))
    for name in SERVER:
        print(_row(name, server[name], None, _get(first, name), mean(name)))
    nodes = makespan(totals, workers)
    compute = nodes + sum(server.values())
    print(f"\nin-process compute of the round: {sum(totals) + sum(server.values()):.1f} s on one worker, "
          f"{compute:.1f} s on {workers} workers (institutions shared as a simulation shares them)")
    if first is not None and first.wait is not None:
        print(f"run, round 1: the server waited {first.wait:.1f} s for the nodes, whose compute takes {nodes:.1f} s on "
              f"{workers} workers here ({first.wait - nodes:+.1f} s); its own compute took "
              f"{sum(getattr(first, n) or 0.0 for n in SERVER):.1f} s, here {sum(server.values()):.1f} s")
    for label, round_s in (("round 1", _get(first, "round_s")), ("mean of rounds", mean("round_s"))):
        if round_s:
            print(f"run, {label}: {round_s:.1f} s a round; framework overhead {round_s - compute:.1f} s "
                  f"= {100 * (round_s - compute) / round_s:.0f} % of the round")
    run_accuracy = f"; the run's round 1: {rows[0].student_accuracy:.4f}" if rows else ""
    print(f"student accuracy after round 1: {accuracy:.4f}{run_accuracy}")


def _row(label: str, total: float, slowest: float | None, first: float | None, mean: float | None) -> str:
    return f"{label:<22}{_s(total):>17}{_s(slowest):>15}{_s(first):>14}{_s(mean):>11}"


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _get(phases: RoundPhases | None, name: str) -> float | None:
    return None if phases is None else getattr(phases, name)


def _mean(values: list[Any]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


if __name__ == "__main__":
    main()
