"""`fedstill bench`: serving speed of the student against the largest teacher, engine by engine, measured in one run.

Six engines answer the same real test inputs at each batch size: the scenario's largest teacher architecture and
the student, each in PyTorch (eager) and in onnxruntime FP32 and INT8. The teacher is exported and quantised the
way `fedstill export` does the student (student/export.py: same exporter, opset, INT8 mode and calibration on the
public set) into `export/teacher/`; its weights are the run's own (an institution's final teacher, from the
simulated institutions' state folders) where the run kept them, else a fresh instance of the architecture:
inference time does not depend on the weights' values.

The student/teacher ratio is read per engine (student/comparison.py), so the runtime's gain is not credited to
distillation; the INT8 student is set against FP32 in onnxruntime, timed in the same run (timing: student/timing.py).
PyTorch and onnxruntime use the same number of intra-op threads.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from safetensors.torch import load_file

from common.errors import ConfigError
from common.files import private_folder
from common.models.inputs import inputs_to_tensor
from common.models.registry import build_model, count_parameters
from common.tasks.samples import FederatedSplit, public_fingerprint
from server.results.run_folder import add_section, write_json
from server.results.schema import ServingSummary
from simulations.student.comparison import (
    ORT_FP32,
    ORT_INT8,
    PYTORCH,
    STUDENT,
    TEACHER,
    engine_name,
    per_engine,
    recommend_precision,
)
from simulations.student.export import (
    BATCHES,
    CALIBRATION_SIZE,
    DYNAMIC_FORMAT,
    EXPORT_DIR,
    ONNX_FP32,
    ONNX_INT8,
    STATIC_FORMAT,
    SUMMARY,
    export_pair,
    export_run,
    ort_engine,
    ort_logits,
    ort_session,
    parity,
)
from simulations.student.load import RunStudent, load_run_split, load_run_student, softmax, torch_logits
from simulations.student.reference_teachers import saved_teacher, sites_folder
from simulations.student.timing import figures, measure, torch_engine

RESULT = "bench.json"
TEACHER_DIR = "teacher"  # export/teacher/<model>.onnx and <model>.int8.onnx: timed only, never shipped
PARITY_SAMPLES = 1000  # test inputs on which the teacher's ONNX files are checked against PyTorch


def largest_teacher(teacher_models: list[str], num_classes: int, input_shape: tuple[int, ...],
                    public: np.ndarray | None = None) -> tuple[str, torch.nn.Module]:
    """The scenario's teacher architecture with the most parameters, as `build_model` makes it (untrained, or a
    pretrained encoder not fine-tuned; fitted on the `public` inputs where it learns from them), in eval mode."""
    built = {name: build_model(name, num_classes, input_shape, seed=0, public=public) for name in dict.fromkeys(teacher_models)}
    name = max(built, key=lambda n: count_parameters(built[n]))
    return name, built[name].eval()


def reference_teacher(student: RunStudent, split: FederatedSplit) -> tuple[str, torch.nn.Module, str]:
    """The largest teacher architecture, with the run's own weights for it where an institution kept them; and
    where its weights come from, in words."""
    cfg = student.cfg
    name, model = largest_teacher(cfg.teacher_model_list, student.meta.num_classes, student.input_shape, split.public.inputs)
    sites, fingerprint = sites_folder(cfg, student.run_dir), public_fingerprint(split.public)
    for pid in (pid for pid in range(cfg.num_clients) if cfg.teacher_model_for(pid) == name):
        found = saved_teacher(cfg, sites, pid, fingerprint)
        if found is not None:
            model.load_state_dict(load_file(str(found[0])))
            return name, model.eval(), (f"institution {pid}'s teacher after {found[1].get('rounds_trained')} round(s), "
                                        f"{found[0]}")
    return name, model, "built fresh, not the institutions' (the run kept none of them; timing only)"


def export_teacher(model: torch.nn.Module, name: str, out: Path, split: FederatedSplit, x_test: torch.Tensor,
                   threads: int) -> dict[str, Any]:
    """The teacher as ONNX FP32 and INT8 in `out`, as the student is exported; parity checked on test inputs."""
    fp32, int8 = private_folder(out) / f"{name}.onnx", out / f"{name}.int8.onnx"
    calibration = inputs_to_tensor(split.public.inputs[:CALIBRATION_SIZE]).numpy()
    mode = export_pair(model, x_test[:1], fp32, int8, calibration)
    x = x_test[:PARITY_SAMPLES]
    torch_probs = softmax(torch_logits(model, x))
    fp32_probs = softmax(ort_logits(ort_session(fp32, threads), x.numpy()))
    int8_probs = softmax(ort_logits(ort_session(int8, threads), x.numpy()))
    return {"files": {p.name: {"path": str(p), "bytes": p.stat().st_size} for p in (fp32, int8)}, "int8_mode": mode,
            "parity_samples": len(x), "parity_fp32": parity(torch_probs, fp32_probs),
            "int8_argmax_agreement_vs_fp32": parity(fp32_probs, int8_probs)["argmax_agreement"]}


def current_export(export: Path) -> bool:
    """Whether `export/` holds both files and a summary written by this version's quantisation recipe (an older
    INT8 file, quantised otherwise, would be timed as if it were today's)."""
    if not all((export / name).is_file() for name in (ONNX_FP32, ONNX_INT8, SUMMARY)):
        return False
    try:
        summary = json.loads((export / SUMMARY).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(summary, dict) and (summary.get("int8") or {}).get("format") in (STATIC_FORMAT, DYNAMIC_FORMAT)


def bench_run(run_dir: Path, *, threads: int = 1, batches: tuple[int, ...] = BATCHES, iterations: int = 300,
              warmup: int = 30, rounds: int = 20, data_dir: str | None = None) -> dict[str, Any]:
    """Time the six engines on the run's test inputs; exports the student first if `export/` lacks it (or holds an
    older version's)."""
    if threads < 1 or iterations < 1 or rounds < 1:
        raise ConfigError(f"threads, iterations and rounds must be >= 1, got {threads}, {iterations}, {rounds}")
    export = Path(run_dir) / EXPORT_DIR
    if not current_export(export):
        export_run(run_dir, threads=threads, data_dir=data_dir)
    student = load_run_student(run_dir, data_dir)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _bench(student, export, threads=threads, batches=batches, iterations=iterations, warmup=warmup,
                      rounds=rounds)
    finally:
        torch.set_num_threads(previous)


def _bench(student: RunStudent, export: Path, *, threads: int, batches: tuple[int, ...], iterations: int,
           warmup: int, rounds: int) -> dict[str, Any]:
    split = load_run_split(student)
    x_test = inputs_to_tensor(split.test.inputs)
    teacher_name, teacher, weights = reference_teacher(student, split)
    teacher_export = export_teacher(teacher, teacher_name, export / TEACHER_DIR, split, x_test, threads)
    teacher_files = [Path(entry["path"]) for entry in teacher_export["files"].values()]
    engines = {
        engine_name(TEACHER, PYTORCH): torch_engine(teacher),
        engine_name(TEACHER, ORT_FP32): ort_engine(teacher_files[0], threads),
        engine_name(TEACHER, ORT_INT8): ort_engine(teacher_files[1], threads),
        engine_name(STUDENT, PYTORCH): torch_engine(student.model),
        engine_name(STUDENT, ORT_FP32): ort_engine(export / ONNX_FP32, threads),
        engine_name(STUDENT, ORT_INT8): ort_engine(export / ONNX_INT8, threads),
    }
    load_before = os.getloadavg()
    table = figures(measure(engines, x_test[:max(batches)].numpy(), batches, iterations, warmup, rounds),
                    reference=engine_name(TEACHER, PYTORCH))
    drop = (student.results.get("export") or {}).get("int8", {}).get("accuracy_drop_points")
    summary = ServingSummary(
        run_dir=str(student.run_dir), threads=threads, batches=list(batches), iterations=iterations, rounds=rounds,
        warmup=warmup,
        teacher={"model": teacher_name, "params": count_parameters(teacher), "weights": weights, **teacher_export},
        student={"model": student.meta.model, "params": count_parameters(student.model)},
        machine={"cpu": _cpu_name(), "cpus": os.cpu_count(), "load_average_before": load_before[0],
                 "load_average_after": os.getloadavg()[0], "torch": torch.__version__, "onnxruntime": ort.__version__,
                 "python": platform.python_version()},
        engines=table, per_engine=per_engine(table),
        int8=None if drop is None else recommend_precision(table[engine_name(STUDENT, ORT_FP32)],
                                                           table[engine_name(STUDENT, ORT_INT8)], float(drop)),
        teacher_int8_x_fp32={b: table[engine_name(TEACHER, ORT_INT8)][b]["throughput"]
                             / table[engine_name(TEACHER, ORT_FP32)][b]["throughput"] for b in map(str, batches)},
    ).to_json()
    write_json(export / RESULT, summary)
    add_section(student.run_dir, "serving", summary)  # results.json and report.md
    return summary


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
