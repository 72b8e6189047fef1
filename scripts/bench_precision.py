"""Speed and effect of `student-precision` on the server's distillation step: fp32 against bf16, in one run.

    .venv/bin/python scripts/bench_precision.py RUN_DIR [--repeats 2] [--threads 1]

The run's trained student stands in for the teacher ensemble: a fresh student (the run's architecture,
seed, optimizer and `student-epochs`) is distilled through `server.distill.Student.distil` on the run's
public set from the trained student's soft labels at the run's temperature, once per precision and
repeat, the precisions alternating so a busy machine slows both alike. Prints the seconds per epoch
(median over repeats), the fresh student's test accuracy and its JS divergence to the soft-label source.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.models.inputs import input_shape, inputs_to_tensor  # noqa: E402
from server.distill import Student  # noqa: E402
from simulations.student.load import load_run_split, load_run_student, softmax, torch_logits  # noqa: E402
from simulations.student.metrics import js_divergence  # noqa: E402

PRECISIONS = ("fp32", "bf16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    source = load_run_student(args.run_dir)
    split = load_run_split(source)
    cfg, temperature = source.cfg, source.cfg.temperature
    targets = softmax(torch_logits(source.model, inputs_to_tensor(split.public.inputs)) / temperature).astype(np.float32)
    reference = softmax(torch_logits(source.model, inputs_to_tensor(split.test.inputs)))
    ids = np.arange(len(split.public), dtype=np.int64)
    rows: dict[str, list[dict[str, float]]] = {p: [] for p in PRECISIONS}
    for repeat in range(args.repeats):
        for precision in PRECISIONS:
            student = Student(dataclasses.replace(cfg, student_precision=precision), split.public.num_classes,
                              input_shape(split.public.inputs))
            started = time.perf_counter()
            student.distil(split.public, ids, targets, round_=1, temperature=temperature)
            seconds = time.perf_counter() - started
            probs = softmax(torch_logits(student.model, inputs_to_tensor(split.test.inputs)))
            rows[precision].append({
                "s_per_epoch": seconds / cfg.student_epochs,
                "accuracy": float((probs.argmax(1) == split.test.labels).mean()),
                "js_bits": float(js_divergence(probs, reference).mean()),
            })
            print(f"repeat {repeat + 1} {precision}: {json.dumps(rows[precision][-1])}", flush=True)
    print(f"\n{source.meta.model} distilled from the run's student on {len(ids)} public samples, "
          f"{cfg.student_epochs} epochs, batch {cfg.student_batch_size}, T = {temperature:g}, {args.threads} thread(s)")
    print("| precision | s / epoch (median) | test accuracy | JS to source (bits) |\n|---|---|---|---|")
    for precision, results in rows.items():
        print(f"| {precision} | {statistics.median(r['s_per_epoch'] for r in results):.2f} | "
              f"{statistics.mean(r['accuracy'] for r in results):.4f} | {statistics.mean(r['js_bits'] for r in results):.4f} |")


if __name__ == "__main__":
    main()
