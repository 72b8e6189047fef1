"""What makes a small institution's teacher good: optimiser steps, batch size, learning rate, architecture.

    .venv/bin/python scripts/bench_local_steps.py [--clients 100] [--rounds 3] [--sample 10]
                                                  [--variant mlp:100:32:0.003 ...]

In one process, without Flower: `--sample` partitions of Fashion-MNIST split among `--clients` institutions
(Dirichlet 0.5, the scale scenarios' split), each one's teacher trained `--rounds` rounds as the ClientApp trains it
(a fresh Adam each round, `local-min-steps` steps at least), then its accuracy on 2,000 test images. A variant is
`model:min-steps:batch:lr` (min-steps 0: one epoch a round, today's default). Prints the mean, least and largest
accuracy of each variant and the seconds it took. Runs on one thread.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import RunConfig, default_run_config  # noqa: E402
from common.models.inputs import input_shape  # noqa: E402
from common.models.registry import build_model  # noqa: E402
from common.models.training import accuracy, train_supervised  # noqa: E402
from common.tasks.partition import partition_rows  # noqa: E402
from common.tasks.registry import load_split  # noqa: E402

VARIANTS = ("cnn-tiny:0:64:0.001", "cnn-tiny:100:64:0.001", "cnn-tiny:100:32:0.001", "cnn-tiny:100:32:0.003",
            "mlp:0:64:0.001", "mlp:50:32:0.001", "mlp:100:32:0.001", "mlp:100:16:0.001", "mlp:100:32:0.003",
            "mlp:200:32:0.001", "cnn-small:100:32:0.003")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sample", type=int, default=10, help="partitions trained (evenly spaced ids)")
    parser.add_argument("--variant", action="append", default=[], help="model:min-steps:batch:lr (repeatable)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = {**default_run_config(), "num-clients": args.clients, "min-clients": 1,
            "min-partition-size": 10 if args.clients > 100 else 20}
    split = load_split("fashion-mnist", str(base["data-dir"]), int(base["public-size"]), int(base["seed"]))
    test_x, test_y = split.test.inputs[:2000], split.test.labels[:2000]
    cfg = RunConfig.from_run_config(base)
    ids = list(range(0, args.clients, max(1, args.clients // args.sample)))[:args.sample]
    parts = {pid: split.private.subset(partition_rows(split, cfg, pid)) for pid in ids}
    print(f"{args.clients} institutions, {args.rounds} rounds, partitions {ids}: {sorted(len(p) for p in parts.values())} "
          "private images")
    for variant in args.variant or VARIANTS:
        model_name, steps, batch, lr = variant.split(":")
        vcfg = RunConfig.from_run_config({**base, "local-min-steps": int(steps), "teacher-batch-size": int(batch)})
        started, accs = time.monotonic(), []
        for pid, data in parts.items():
            model = build_model(model_name, data.num_classes, input_shape(data.inputs), seed=pid)
            for round_ in range(args.rounds):
                train_supervised(model, data.inputs, data.labels, epochs=vcfg.local_epochs_for(len(data)), lr=float(lr),
                                 batch_size=int(batch), seed=pid * 1_009 + round_)
            accs.append(accuracy(model, test_x, test_y))
        print(f"{model_name:9s} min-steps {int(steps):3d}  batch {int(batch):2d}  lr {float(lr):g}: mean {np.mean(accs):.3f} "
              f"(least {np.min(accs):.3f}, largest {np.max(accs):.3f})  {time.monotonic() - started:.1f} s", flush=True)


if __name__ == "__main__":
    main()
