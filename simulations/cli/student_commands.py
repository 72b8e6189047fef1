"""`fedstill export`, `evaluate` and `bench`: the student of a finished run as a product to ship."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from common.errors import FedstillError
from simulations.cli.console import console, fail

RUN_DIR = typer.Argument(..., help="A run folder (results.json, student.json, student.safetensors).")
DATA_DIR = typer.Option("", "--data-dir", help="Where the run's data set is now, when it moved since the run.")


def export(
    run_dir: Path = RUN_DIR,
    calibration: int = typer.Option(512, min=1, help="Public samples that calibrate static INT8 quantisation."),
    mode: str = typer.Option("auto", help="INT8 quantisation: auto (static for CNNs, dynamic otherwise), static, dynamic."),
    threads: int = typer.Option(1, min=1, help="PyTorch and onnxruntime intra-op threads for the parity check and timing."),
    iterations: int = typer.Option(300, min=1, help="Timed calls of FP32 and INT8 per batch size."),
    rounds: int = typer.Option(20, min=1, help="Interleaved blocks the timed calls are split into."),
    data_dir: str = DATA_DIR,
) -> None:
    """Export the student to ONNX, check parity with PyTorch, quantise to INT8, time both and say which to ship
    (RUN_DIR/export/)."""
    from simulations.student.export import EXPORT_DIR, SUMMARY, export_run

    _use_threads(threads)
    try:
        s = export_run(run_dir, calibration_size=calibration, mode=mode, threads=threads, data_dir=data_dir or None,
                       iterations=iterations, rounds=rounds)
    except FedstillError as error:
        fail(error)
    table = Table(title=f"fedstill export: {s['model']} (round {s['round']}), {s['test_samples']} test samples")
    for column in ("figure", "value"):
        table.add_column(column)
    parity, int8, acc = s["parity_fp32"], s["int8"], s["accuracy"]
    rows = [
        ("ONNX opset", str(s["opset"])),
        ("FP32 vs PyTorch: max |p diff|", f"{parity['max_abs_prob_diff']:.2e}"),
        ("FP32 vs PyTorch: argmax agree", f"{parity['argmax_agreement']:.4%}"),
        ("accuracy PyTorch/FP32/INT8", f"{acc['pytorch']:.4f} / {acc['onnx_fp32']:.4f} / {acc['onnx_int8']:.4f}"),
        (f"INT8 {int8['mode']}", int8["format"]),
        ("INT8 vs FP32", f"accuracy {-int8['accuracy_drop_points']:+.2f} points, argmax agree "
                         f"{int8['argmax_agreement_vs_fp32']:.2%}"),
        *((f"{name}", f"{entry['bytes']:,} bytes") for name, entry in s["files"].items()),
        *((f"{name.split(', ')[-1].replace('ORT', 'ONNX Runtime')}, batch {b}",
           f"{row['throughput']:,.0f} samples/s, p50 {row['p50_ms']:.3f} ms")
          for name, by_batch in s["speed"]["engines"].items() for b, row in by_batch.items()),
    ]
    for row in rows:
        table.add_row(*row)
    console.print(table)
    choice = s["recommendation"]
    console.print(f"[bold]ship {choice['precision'].upper()}[/]: {escape(choice['reason'])} "
                  f"({s['speed']['threads']} thread(s), {s['speed']['iterations']} calls per cell, timed in this run)")
    console.print(f"wrote {escape(str(Path(run_dir) / EXPORT_DIR / SUMMARY))}")


def evaluate(
    run_dir: Path = RUN_DIR,
    with_teachers: bool = typer.Option(False, "--with-teachers", help="Compare with the teacher ensemble (JS divergence): the "
                                       "run's own teachers where its simulated institutions kept them, else retrained here on "
                                       "their partitions (cached)."),
    retrain_teachers: bool = typer.Option(False, help="Retrain the teachers even when the run's own are stored or the cache matches."),
    sigmas: str = typer.Option("", help="Gaussian noise sigmas, comma-separated (images, tables; default per kind)."),
    epsilons: str = typer.Option("", help="FGSM epsilons, comma-separated (images, tables; default per kind)."),
    rates: str = typer.Option("", help="Token dropout and substitution rates, comma-separated (texts)."),
    bins: int = typer.Option(15, min=1, help="Equal-width confidence bins of the ECE."),
    threads: int = typer.Option(1, min=1, help="PyTorch intra-op threads (teachers retrain with the run's torch-threads)."),
    data_dir: str = DATA_DIR,
) -> None:
    """Accuracy, macro-F1, ECE, JS divergence to the teacher ensemble, robustness, size (RUN_DIR/evaluation/)."""
    from simulations.student.evaluate import EVAL_DIR, REPORT, evaluate_run
    from simulations.student.load import load_run_student
    from simulations.student.robustness import parse_levels

    _use_threads(threads)
    try:
        student = load_run_student(run_dir, data_dir or None)
        ensemble = None
        if with_teachers:
            from simulations.student.reference_teachers import reference_ensemble

            with console.status("teachers") as status:
                ensemble = reference_ensemble(student, retrain=retrain_teachers, on_teacher=lambda pid, name:
                                              status.update(f"retraining teacher {pid + 1}/{student.cfg.num_clients} ({name})"))
        levels = {name: parse_levels(text, option) for name, text, option in (
            ("gaussian", sigmas, "--sigmas"), ("fgsm", epsilons, "--epsilons"), ("token_dropout", rates, "--rates"),
            ("token_substitution", rates, "--rates")) if text}
        evaluate_run(student, ensemble=ensemble, bins=bins, levels=levels)
    except FedstillError as error:
        fail(error)
    out = Path(run_dir) / EVAL_DIR
    console.print((out / REPORT).read_text(encoding="utf-8"), markup=False, highlight=False)
    console.print(f"wrote {escape(str(out))}/ ({', '.join(sorted(p.name for p in out.iterdir() if not p.name.startswith('.')))})")


def bench(
    run_dir: Path = RUN_DIR,
    threads: int = typer.Option(1, min=1, help="Intra-op threads of PyTorch and onnxruntime alike."),
    iterations: int = typer.Option(300, min=1, help="Timed calls per engine and batch size."),
    rounds: int = typer.Option(20, min=1, help="Interleaved blocks the calls are split into."),
    data_dir: str = DATA_DIR,
) -> None:
    """Throughput and latency (batch 1 and 64) of the largest teacher and the student, each in PyTorch, ONNX FP32
    and ONNX INT8; the student/teacher ratio per engine, and INT8 or FP32."""
    from simulations.student.bench import bench_run

    try:
        result = bench_run(run_dir, threads=threads, iterations=iterations, rounds=rounds, data_dir=data_dir or None)
    except FedstillError as error:
        fail(error)
    print_bench(result)


def print_bench(result: dict[str, Any]) -> None:
    m = result["machine"]
    console.print(f"[bold]fedstill bench[/]: {result['threads']} intra-op thread(s) for PyTorch and ONNX Runtime (ORT), "
                  f"{result['iterations']} calls per cell in {result['rounds']} interleaved rounds; {escape(m['cpu'])} "
                  f"({m['cpus']} CPUs, load average {m['load_average_before']:.1f} -> {m['load_average_after']:.1f})")
    table = Table()
    for column in ("engine", "batch", "samples/s", "x teacher", "p50 ms", "p95 ms"):
        table.add_column(column, justify="left" if column == "engine" else "right")
    for name, by_batch in result["engines"].items():
        for b, row in by_batch.items():
            table.add_row(name, b, f"{row['throughput']:,.0f}", f"{row['throughput_x_teacher']:.2f}",
                          f"{row['p50_ms']:.3f}", f"{row['p95_ms']:.3f}")
    console.print(table)
    like = Table(title="student against teacher, same engine")
    for column in ("engine", "batch", "student samples/s", "teacher samples/s", "student x teacher"):
        like.add_column(column, justify="left" if column == "engine" else "right")
    for engine, by_batch in (result.get("per_engine") or {}).items():
        for b, row in by_batch.items():
            like.add_row(engine, b, f"{row['student_throughput']:,.0f}", f"{row['teacher_throughput']:,.0f}",
                         f"{row['student_x_teacher']:.2f}")
    console.print(like)
    teacher = result["teacher"]
    console.print(f"teacher: the scenario's largest, {teacher['model']} ({teacher['params']:,} params), weights "
                  f"{escape(teacher['weights'])}: inference time does not depend on them; student: "
                  f"{result['student']['model']} ({result['student']['params']:,} params). samples/s = batch / "
                  f"median call; x teacher: against the teacher in PyTorch")
    if result.get("int8"):
        console.print(f"[bold]ship {result['int8']['precision'].upper()}[/]: {escape(result['int8']['reason'])}")
    console.print(f"wrote {escape(str(Path(result['run_dir']) / 'export' / 'bench.json'))}")


def _use_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
