"""Which engine and batch size label a public set fastest here: eager PyTorch (inference mode) against the model
exported to ONNX and run in onnxruntime (common/models/onnx_engine.py), for the default scenario's teachers and
student, on 10,000 Fashion-MNIST-shaped images, with the thread count a simulated node uses (1).

    PYTHONPATH=$PWD .venv/bin/python scripts/bench_inference.py [--threads 1] [--rows 10000] [--repeats 3]

Each figure is the best of `--repeats` passes, engines interleaved in one run (the machine is shared: read the
ratios). The export column is the time to export a freshly trained model and open its session (the first
export in a process also imports the exporter: printed apart).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import numpy as np
import torch

from common.models.inputs import inputs_to_tensor
from common.models.onnx_engine import onnx_bytes, ort_logits, ort_session
from common.models.registry import build_model

MODELS = ("cnn-small", "cnn-large", "cnn-student")
TORCH_BATCHES = (64, 256, 1024)
ORT_BATCHES = (64, 256, 1024)


def best_of(repeats: int, work: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return best


def torch_pass(model: torch.nn.Module, x: torch.Tensor, batch: int) -> None:
    with torch.inference_mode():
        for start in range(0, len(x), batch):
            model(x[start:start + batch])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    x = inputs_to_tensor(rng.integers(0, 256, size=(args.rows, 28, 28), dtype=np.uint8))
    start = time.perf_counter()
    onnx_bytes(build_model("cnn-student", 10, (28, 28), seed=0), x[:1])
    print(f"first export in this process (imports the exporter): {time.perf_counter() - start:.2f} s")
    header = [f"torch b{b}" for b in TORCH_BATCHES] + ["export+session"] + [f"ort b{b}" for b in ORT_BATCHES]
    print(f"\nseconds to label {args.rows:,} images, {args.threads} thread(s), best of {args.repeats}")
    print("| model | " + " | ".join(header) + " | torch best / ort best |")
    print("|---" * (len(header) + 2) + "|")
    for name in MODELS:
        model = build_model(name, 10, (28, 28), seed=0).eval()
        figures = [best_of(args.repeats, partial(torch_pass, model, x, b)) for b in TORCH_BATCHES]
        start = time.perf_counter()
        session = ort_session(onnx_bytes(model, x[:1]), threads=args.threads)
        export_s = time.perf_counter() - start
        inputs = x.numpy()
        ort_figures = [best_of(args.repeats, partial(ort_logits, session, inputs, b)) for b in ORT_BATCHES]
        cells = [f"{f:.3f}" for f in figures] + [f"{export_s:.3f}"] + [f"{f:.3f}" for f in ort_figures]
        print(f"| {name} | " + " | ".join(cells) + f" | {min(figures) / min(ort_figures):.2f}x |")


if __name__ == "__main__":
    main()
