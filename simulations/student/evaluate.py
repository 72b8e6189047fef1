"""Evaluation of a run's student beyond accuracy, written into `<run folder>/evaluation/`.

    evaluation.json  accuracy, macro-F1, ECE, knowledge retention (JS divergence to the teacher ensemble,
                     when an ensemble is given), robustness curves, model size
    evaluation.md    the same as tables, with what each figure means
    robustness.png   accuracy against Gaussian noise sigma and FGSM epsilon

The teachers are not in the run folder (they stay at the institutions): the caller passes the ensemble's
test-set logits when it has them (`simulations.student.reference_teachers` retrains them) and says where they came from.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.files import PRIVATE, atomic_path, atomic_write_text, private_folder
from common.metrics import macro_f1
from common.models.inputs import inputs_to_tensor
from common.models.registry import count_parameters
from common.tasks.samples import FederatedSplit, task_of
from server.results.run_folder import STUDENT, add_section, write_json
from simulations.student.export import EXPORT_DIR, ONNX_FP32, ONNX_INT8
from simulations.student.load import RunStudent, load_run_split, softmax, torch_logits
from simulations.student.metrics import ECE_BINS, expected_calibration_error, js_divergence
from simulations.student.robustness import fgsm_curve, noise_curve, seeded_curve, token_dropout, token_substitution

EVAL_DIR = "evaluation"
SUMMARY, REPORT, PLOT = "evaluation.json", "evaluation.md", "robustness.png"
# Perturbations and their default levels per input kind: images in [0, 1] pixel units, tabular features in
# standard deviations, texts as the share of ordinary tokens perturbed.
CURVES = {
    "image": {"gaussian": (0.0, 0.05, 0.1, 0.2, 0.3), "fgsm": (0.0, 0.01, 0.02, 0.05, 0.1)},
    "tabular": {"gaussian": (0.0, 0.1, 0.25, 0.5, 1.0), "fgsm": (0.0, 0.05, 0.1, 0.25, 0.5)},
    "text": {"token_dropout": (0.0, 0.1, 0.2, 0.3, 0.5), "token_substitution": (0.0, 0.1, 0.2, 0.3, 0.5)},
}
TITLES = {"gaussian": "Gaussian noise sigma", "fgsm": "FGSM epsilon", "token_dropout": "token dropout rate",
          "token_substitution": "token substitution rate"}
INPUT_NOTES = {
    "image": "pixels scaled to [0, 1], perturbed images clipped to [0, 1]; FGSM white-box, one step, L-infinity "
             "radius epsilon (Goodfellow et al., 2015)",
    "tabular": "standardised features (units of one standard deviation), not clipped; FGSM white-box, one step, "
               "L-infinity radius epsilon (Goodfellow et al., 2015)",
    "text": "token ids; padding and the tokenizer's special tokens are never perturbed; dropped tokens close up, "
            "substitutes are drawn uniformly from the tokens of the public set",
}


@dataclass(frozen=True)
class EnsembleLogits:
    """The teacher ensemble on the test set, and an honest account of where it came from."""

    probs_at: Callable[[float], np.ndarray]  # temperature -> (n_test, C) aggregated probabilities, rows sum to 1
    source: str  # one sentence: how these teachers were obtained
    details: dict[str, Any] = field(default_factory=dict)  # teacher accuracies, notes, exactness


def retention(student_logits: np.ndarray, ensemble: EnsembleLogits, labels: np.ndarray, temperature: float) -> dict[str, Any]:
    """JS divergence (bits) student vs ensemble at T = 1 and at the distillation temperature; top-1 agreement."""
    student, teachers = softmax(student_logits), ensemble.probs_at(1.0)
    at_t = js_divergence(softmax(student_logits / temperature), ensemble.probs_at(temperature))
    js = js_divergence(student, teachers)
    return {
        "js_divergence_bits": float(js.mean()), "js_divergence_bits_median": float(np.median(js)),
        "js_divergence_bits_at_distillation_temperature": float(at_t.mean()), "distillation_temperature": temperature,
        "top1_agreement": float((student.argmax(1) == teachers.argmax(1)).mean()),
        "ensemble_accuracy": float((teachers.argmax(1) == labels).mean()),
        "source": ensemble.source, **ensemble.details,
    }


def robustness(model: torch.nn.Module, split: FederatedSplit, levels: Mapping[str, list[float]], seed: int) -> dict[str, Any]:
    """Test accuracy along each perturbation curve of the split's input kind (`CURVES`), at `levels` (or the defaults)."""
    kind = task_of(split.test)
    x, y = inputs_to_tensor(split.test.inputs), torch.from_numpy(np.array(split.test.labels, dtype=np.int64))  # writable copy
    curves = {name: list(levels.get(name) or defaults) for name, defaults in CURVES[kind].items()}
    if kind == "text":
        protected, candidates = _token_sets(split)
        perturb = {"token_dropout": lambda xb, rate, g: token_dropout(xb, rate, g, protected),
                   "token_substitution": lambda xb, rate, g: token_substitution(xb, rate, g, protected, candidates)}
        points = {name: seeded_curve(model, x, y, curves[name], seed, perturb[name]) for name in curves}
    else:
        clip = (0.0, 1.0) if kind == "image" else None
        points = {"gaussian": noise_curve(model, x, y, curves["gaussian"], seed, clip),
                  "fgsm": fgsm_curve(model, x, y, curves["fgsm"], clip)}
    return {"input": INPUT_NOTES[kind], "seed": seed,
            "curves": {name: {"title": TITLES[name], "points": points[name]} for name in curves}}


def _token_sets(split: FederatedSplit) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokenizer's special ids (never perturbed) and the ordinary tokens of the public set (substitutes)."""
    from common.models.text import PAD_ID, tokenizer

    protected = torch.tensor(sorted(set(tokenizer().all_special_ids) | {PAD_ID}), dtype=torch.int64)
    seen = torch.from_numpy(np.unique(split.public.inputs))
    return protected, seen[~torch.isin(seen, protected)]


def model_size(student: RunStudent) -> dict[str, Any]:
    size: dict[str, int | None] = {"params": count_parameters(student.model),
                                   "safetensors_bytes": (student.run_dir / STUDENT).stat().st_size}
    for key, name in (("onnx_fp32_bytes", ONNX_FP32), ("onnx_int8_bytes", ONNX_INT8)):
        path = student.run_dir / EXPORT_DIR / name
        size[key] = path.stat().st_size if path.is_file() else None  # `fedstill export` writes them
    return size


def evaluate_run(student: RunStudent, *, ensemble: EnsembleLogits | None = None,
                 levels: Mapping[str, list[float]] | None = None, bins: int = ECE_BINS) -> dict[str, Any]:
    """Every figure of the student on its run's test set; writes the evaluation folder and returns the summary."""
    split = load_run_split(student)
    inputs, labels = split.test.inputs, np.asarray(split.test.labels)
    logits = torch_logits(student.model, inputs_to_tensor(inputs))
    probs = softmax(logits)
    predicted = probs.argmax(axis=1)
    summary: dict[str, Any] = {
        "run_dir": str(student.run_dir), "model": student.meta.model, "round": student.meta.round,
        "dataset": student.cfg.dataset, "test_samples": int(len(labels)),
        "accuracy": float((predicted == labels).mean()), "macro_f1": macro_f1(predicted, labels),
        "ece": expected_calibration_error(probs, labels, bins), "ece_bins": bins,
        "retention": retention(logits, ensemble, labels, student.cfg.temperature) if ensemble is not None else {
            "source": None, "note": "no teacher ensemble: the teachers stay at the institutions; `fedstill evaluate "
                                    "--with-teachers` uses a simulated run's own or retrains them on their partitions"},
        "robustness": robustness(student.model, split, levels or {}, student.cfg.seed),
        "size": model_size(student),
    }
    out = private_folder(student.run_dir / EVAL_DIR)
    write_json(out / SUMMARY, summary)
    atomic_write_text(out / REPORT, report(summary), mode=PRIVATE)
    plot_robustness(summary, out / PLOT)
    add_section(student.run_dir, "evaluation", summary)  # results.json and report.md
    return summary


def report(s: dict[str, Any]) -> str:
    """The evaluation as markdown: headline table, retention, robustness, size."""
    r, rob, size = s["retention"], s["robustness"], s["size"]
    lines = [f"# Evaluation of the student ({s['model']}, round {s['round']}, {s['dataset']})", "",
             f"Test set: {s['test_samples']} samples.", "", "| figure | value |", "|---|---|",
             f"| accuracy | {s['accuracy']:.4f} |", f"| macro-F1 | {s['macro_f1']:.4f} |",
             f"| ECE ({s['ece_bins']} equal-width bins) | {s['ece']:.4f} |"]
    if r.get("source"):
        lines += [f"| JS divergence to the teacher ensemble, T = 1 (bits, mean) | {r['js_divergence_bits']:.4f} |",
                  f"| JS divergence at T = {r['distillation_temperature']:g} (bits, mean) | "
                  f"{r['js_divergence_bits_at_distillation_temperature']:.4f} |",
                  f"| top-1 agreement with the ensemble | {r['top1_agreement']:.4f} |",
                  f"| ensemble accuracy | {r['ensemble_accuracy']:.4f} |"]
    lines += [f"| parameters | {size['params']:,} |", f"| student.safetensors | {size['safetensors_bytes']:,} bytes |"]
    lines += [f"| {label} | {size[key]:,} bytes |" for key, label in
              (("onnx_fp32_bytes", "student.onnx (FP32)"), ("onnx_int8_bytes", "student.int8.onnx (INT8)")) if size[key]]
    lines += ["", "## Knowledge retention", "",
              f"Teacher ensemble: {r['source']}." if r.get("source") else r["note"] + "."]
    if r.get("max_abs_diff_to_recorded") is not None:
        lines.append(f"- these teachers' test accuracies against those the run recorded (both sorted): "
                     f"max |difference| {r['max_abs_diff_to_recorded']:.4f}")
    lines += [f"- {note}" for note in r.get("notes", [])]
    lines += ["", "## Robustness", "", f"Inputs: {rob['input']}. Random perturbations seeded with {rob['seed']}.", ""]
    for curve in rob["curves"].values():
        lines += [f"| {curve['title']} | accuracy |", "|---|---|"]
        lines += [f"| {point['level']:g} | {point['accuracy']:.4f} |" for point in curve["points"]] + [""]
    return "\n".join(lines + [f"![robustness]({PLOT})", ""])


def plot_robustness(s: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = list(s["robustness"]["curves"].values())
    fig, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 3.6), sharey=True, squeeze=False)
    for ax, curve in zip(axes[0], curves, strict=True):
        points = curve["points"]
        ax.plot([p["level"] for p in points], [p["accuracy"] for p in points], marker="o")
        ax.set_xlabel(curve["title"])
        ax.grid(alpha=0.3)
    axes = axes[0]
    axes[0].set_ylabel("test accuracy")
    axes[0].set_ylim(0, 1)
    fig.suptitle(f"{s['model']} on {s['dataset']}: accuracy under input perturbation")
    fig.tight_layout()
    with atomic_path(path, mode=PRIVATE, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
