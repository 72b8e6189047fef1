"""Like-for-like readings of timed engines: the student against the teacher in each engine, and whether the INT8
student earns its place against FP32.

Engines are named "<role>, <engine>" ("student, ORT INT8"); a table is `timing.figures`' (engine -> batch -> row).
Plain arithmetic on measured figures; nothing here times or runs a model.
"""

from __future__ import annotations

from typing import Any

from simulations.student.timing import Table

PYTORCH, ORT_FP32, ORT_INT8 = "PyTorch", "ORT FP32", "ORT INT8"
ENGINES = (PYTORCH, ORT_FP32, ORT_INT8)
STUDENT, TEACHER = "student", "teacher"
MAX_DROP_POINTS = 1.0  # INT8 may lose at most this many points of test accuracy against FP32
FP32, INT8 = "fp32", "int8"


def engine_name(role: str, engine: str) -> str:
    return f"{role}, {engine}"


def per_engine(table: Table) -> dict[str, dict[str, dict[str, float]]]:
    """For each engine that timed both the student and the teacher, per batch size: both throughputs (samples/s),
    `student_x_teacher` (student's throughput / teacher's: how many times as many samples the student answers in
    the same time, in the same engine) and `p50_ratio` (student's median call / teacher's)."""
    ratios: dict[str, dict[str, dict[str, float]]] = {}
    for engine in ENGINES:
        student, teacher = table.get(engine_name(STUDENT, engine)), table.get(engine_name(TEACHER, engine))
        if student is None or teacher is None:
            continue
        ratios[engine] = {batch: {"student_throughput": row["throughput"], "teacher_throughput": teacher[batch]["throughput"],
                                  "student_x_teacher": row["throughput"] / teacher[batch]["throughput"],
                                  "p50_ratio": row["p50_ms"] / teacher[batch]["p50_ms"]}
                          for batch, row in student.items() if batch in teacher}
    return ratios


def recommend_precision(fp32: dict[str, dict[str, float]], int8: dict[str, dict[str, float]],
                        accuracy_drop_points: float, engine: str = "ONNX Runtime") -> dict[str, Any]:
    """INT8 only where it is faster than FP32 at every batch size measured (the same engine, timed in the same run)
    and loses at most `MAX_DROP_POINTS` points of test accuracy; otherwise FP32, with the reasons and the figures.

    fp32, int8  # batch size -> {"throughput": samples/s, ...}: the two models' rows of one `timing.figures` table
    accuracy_drop_points  # 100 x (FP32's test accuracy - INT8's): negative where INT8 is more accurate
    """
    batches = [b for b in fp32 if b in int8]
    if not batches:
        raise ValueError("recommend_precision: FP32 and INT8 share no measured batch size")
    speedup = {b: int8[b]["throughput"] / fp32[b]["throughput"] for b in batches}
    slower = [b for b in batches if speedup[b] <= 1.0]
    accurate = accuracy_drop_points <= MAX_DROP_POINTS + 1e-9

    def speeds(which: list[str]) -> str:
        return ", ".join(f"batch {b}: {speedup[b]:.2f}x FP32's samples/s ({int8[b]['throughput']:,.0f} against "
                         f"{fp32[b]['throughput']:,.0f})" for b in which)

    accuracy = f"{0.0 - accuracy_drop_points:+.2f} points of test accuracy against FP32"
    if not slower and accurate:
        precision, reason = INT8, f"INT8 is faster in {engine} at every batch size measured ({speeds(batches)}) at {accuracy}"
    else:
        why = []
        if slower:
            why.append(f"INT8 is not faster in {engine} at {speeds(slower)}")
        if not accurate:
            why.append(f"INT8 loses {accuracy_drop_points:.2f} points of test accuracy, more than {MAX_DROP_POINTS:g}")
        elif slower:
            why.append(f"though it is within {MAX_DROP_POINTS:g} point ({accuracy})")
        precision, reason = FP32, "; ".join(why)
    return {"precision": precision, "reason": reason, "engine": engine, "int8_x_fp32": speedup,
            "accuracy_drop_points": accuracy_drop_points, "max_drop_points": MAX_DROP_POINTS}
