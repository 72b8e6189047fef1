"""`fedstill bench`: serving speed of the student against the largest teacher, measured in one run.

Four engines answer the same real test inputs at each batch size: the scenario's largest teacher
architecture in PyTorch, the student in PyTorch, and the student in onnxruntime FP32 and INT8 (the
files `fedstill export` writes). The teachers stay at the institutions, so the teacher is a fresh
instance of the largest architecture (untrained, or a pretrained encoder not fine-tuned): inference
time does not depend on the weights' values.

Timing: every call is timed alone (perf_counter); the engines take turns in `rounds` interleaved
blocks, so a busy machine slows all of them alike. Latency is per call, p50 and p95; throughput is the
batch size over the median call (samples/s), which a shared machine's stalls do not swamp; the mean
over all calls (total samples / total time) is kept beside it. PyTorch and onnxruntime use the same
number of intra-op threads.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.errors import ConfigError
from common.models.inputs import inputs_to_tensor
from common.models.registry import build_model, count_parameters
from server.results.run_folder import add_section, write_json
from simulations.student.export import EXPORT_DIR, INPUT, ONNX_FP32, ONNX_INT8, export_run, ort_session
from simulations.student.load import RunStudent, load_run_split, load_run_student

RESULT = "bench.json"
BATCHES = (1, 64)


def largest_teacher(teacher_models: list[str], num_classes: int, input_shape: tuple[int, ...]) -> tuple[str, torch.nn.Module]:
    """The scenario's teacher architecture with the most parameters, as `build_model` makes it (untrained, or a
    pretrained encoder not fine-tuned), in eval mode."""
    built = {name: build_model(name, num_classes, input_shape, seed=0) for name in dict.fromkeys(teacher_models)}
    name = max(built, key=lambda n: count_parameters(built[n]))
    return name, built[name].eval()


def torch_engine(model: torch.nn.Module) -> Callable[[np.ndarray], Any]:
    def call(x: np.ndarray) -> Any:
        with torch.inference_mode():
            return model(torch.from_numpy(x))
    return call


def ort_engine(path: Path, threads: int) -> Callable[[np.ndarray], Any]:
    session = ort_session(path, threads)
    return lambda x: session.run(None, {INPUT: x})


def measure(engines: dict[str, Callable[[np.ndarray], Any]], inputs: np.ndarray, batches: tuple[int, ...],
            iterations: int, warmup: int, rounds: int) -> dict[str, dict[int, list[float]]]:
    """Per engine and batch size, the seconds of each timed call, in interleaved blocks."""
    times: dict[str, dict[int, list[float]]] = {name: {b: [] for b in batches} for name in engines}
    for engine in engines.values():
        for b in batches:
            for _ in range(warmup):
                engine(inputs[:b])
    per_block = max(1, iterations // rounds)
    for _ in range(rounds):
        for name, engine in engines.items():
            for b in batches:
                x = inputs[:b]
                for _ in range(per_block):
                    started = time.perf_counter()
                    engine(x)
                    times[name][b].append(time.perf_counter() - started)
    return times


def figures(times: dict[str, dict[int, list[float]]], reference: str) -> dict[str, dict[str, dict[str, float]]]:
    """Throughput (samples/s at the median call, and over all calls), p50/p95 latency (ms), and ratios to the
    `reference` engine."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for name, by_batch in times.items():
        table[name] = {}
        for b, seconds in by_batch.items():
            s = np.asarray(seconds)
            p50 = float(np.percentile(s, 50))
            table[name][str(b)] = {"throughput": b / p50, "throughput_mean": b * len(s) / float(s.sum()),
                                   "p50_ms": 1e3 * p50, "p95_ms": 1e3 * float(np.percentile(s, 95)), "calls": len(s)}
    for name in table:
        for batch, row in table[name].items():
            ref = table[reference][batch]
            row["throughput_x_teacher"] = row["throughput"] / ref["throughput"]
            row["p50_vs_teacher"] = row["p50_ms"] / ref["p50_ms"]
    return table


def bench_run(run_dir: Path, *, threads: int = 1, batches: tuple[int, ...] = BATCHES, iterations: int = 300,
              warmup: int = 30, rounds: int = 5, data_dir: str | None = None) -> dict[str, Any]:
    """Time the four engines on the run's test inputs; exports the student first if `export/` lacks it."""
    if threads < 1 or iterations < 1 or rounds < 1:
        raise ConfigError(f"threads, iterations and rounds must be >= 1, got {threads}, {iterations}, {rounds}")
    student = load_run_student(run_dir, data_dir)
    export = Path(run_dir) / EXPORT_DIR
    if not ((export / ONNX_FP32).is_file() and (export / ONNX_INT8).is_file()):
        export_run(run_dir, threads=threads, data_dir=data_dir)
    inputs = inputs_to_tensor(load_run_split(student).test.inputs[:max(batches)]).numpy()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _bench(student, export, inputs, threads=threads, batches=batches, iterations=iterations,
                      warmup=warmup, rounds=rounds)
    finally:
        torch.set_num_threads(previous)


def _bench(student: RunStudent, export: Path, inputs: np.ndarray, *, threads: int, batches: tuple[int, ...],
           iterations: int, warmup: int, rounds: int) -> dict[str, Any]:
    teacher_name, teacher = largest_teacher(student.cfg.teacher_model_list, student.meta.num_classes,
                                            student.input_shape)
    engines = {
        "teacher, PyTorch": torch_engine(teacher),
        "student, PyTorch": torch_engine(student.model),
        "student, ORT FP32": ort_engine(export / ONNX_FP32, threads),
        "student, ORT INT8": ort_engine(export / ONNX_INT8, threads),
    }
    load_before = os.getloadavg()
    times = measure(engines, inputs, batches, iterations, warmup, rounds)
    result = {
        "run_dir": str(student.run_dir), "threads": threads, "batches": list(batches), "iterations": iterations,
        "rounds": rounds, "warmup": warmup,
        "teacher": {"model": teacher_name, "params": count_parameters(teacher),
                    "weights": "built fresh, not the institutions' (timing only)"},
        "student": {"model": student.meta.model, "params": count_parameters(student.model)},
        "machine": {"cpu": _cpu_name(), "cpus": os.cpu_count(), "load_average_before": load_before[0],
                    "load_average_after": os.getloadavg()[0], "torch": torch.__version__, "python": platform.python_version()},
        "engines": figures(times, reference=next(iter(engines))),
    }
    write_json(export / RESULT, result)
    add_section(student.run_dir, "serving", result)  # results.json and report.md
    return result


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
