"""The server's student: distilled from the aggregated soft labels on the public set, then evaluated."""

from __future__ import annotations

import numpy as np
import torch

from common.config import RunConfig
from common.losses import distillation_loss
from common.models.augment import augment_images
from common.models.inputs import inputs_to_tensor
from common.models.registry import build_model, count_parameters, head_parameters, lr_of
from common.models.training import accuracy, evaluate, train_epochs
from common.tasks.samples import Samples

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16}  # run-config `student-precision` -> autocast dtype


class Student:
    """The shared lightweight model and its optimizer, kept across rounds."""

    def __init__(self, cfg: RunConfig, num_classes: int, input_shape: tuple[int, ...]):
        self.cfg = cfg
        self.model = build_model(cfg.student_model, num_classes, input_shape, seed=cfg.seed)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr_of(self.model, cfg.student_lr))
        self.head_optimizer = torch.optim.Adam(head_parameters(self.model), lr=lr_of(self.model, cfg.student_lr))
        self.params = count_parameters(self.model)

    def distil(
        self, public: Samples, sample_ids: np.ndarray, ensemble: np.ndarray, round_: int, temperature: float
    ) -> float:
        """KD on the given public samples; returns the last epoch's loss.

        Two-stage when `student-head-epochs` > 0: the head alone first (the body frozen), then every
        layer for `student-epochs`. The first `labelled-size` public samples count as labelled for the
        optional CE term. With `student-augment` each batch is a fresh random view of its images, under the
        teachers' labels of the originals.
        ensemble  # (len(sample_ids), C) float32, rows on the simplex, made at `temperature`
        """
        cfg = self.cfg
        x = inputs_to_tensor(public.inputs[sample_ids])
        targets = torch.from_numpy(np.asarray(ensemble, dtype=np.float32))
        labels = torch.from_numpy(public.labels[sample_ids].astype(np.int64))
        labelled = torch.from_numpy(sample_ids < cfg.labelled_size)

        views = torch.Generator().manual_seed(cfg.seed + round_ + 20_000)  # student-augment's draws, per round

        def batch_loss(idx: np.ndarray) -> torch.Tensor:
            with self.autocast():
                logits = self.model(augment_images(x[idx], cfg.student_augment, views))
            return distillation_loss(
                logits.float(), targets[idx], temperature,
                labels=labels[idx], labelled=labelled[idx], ce_weight=cfg.ce_weight,
            )

        if cfg.student_head_epochs:
            train_epochs(
                self.model, self.head_optimizer, len(sample_ids), batch_loss,
                epochs=cfg.student_head_epochs, batch_size=cfg.student_batch_size, seed=cfg.seed + round_ + 10_000,
            )
        return train_epochs(
            self.model, self.optimizer, len(sample_ids), batch_loss,
            epochs=cfg.student_epochs, batch_size=cfg.student_batch_size, seed=cfg.seed + round_,
        )

    def autocast(self) -> torch.autocast:
        """Mixed precision for the student's forward pass (`student-precision`): bf16 autocast on the
        model's device, or nothing for fp32. Weights, optimizer state and the loss stay float32."""
        dtype = AUTOCAST_DTYPES[self.cfg.student_precision]
        device = next(self.model.parameters()).device.type
        return torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None)

    def optimizer_states(self) -> dict[str, dict]:
        """The optimizers' state, kept across rounds and so across a resume."""
        return {"optimizer": self.optimizer.state_dict(), "head_optimizer": self.head_optimizer.state_dict()}

    def restore(self, weights: dict[str, torch.Tensor], optimizers: dict[str, dict]) -> None:
        """Continue from a checkpoint: the weights, then each optimizer's moments and step counts."""
        self.model.load_state_dict(weights)
        self.optimizer.load_state_dict(optimizers["optimizer"])
        self.head_optimizer.load_state_dict(optimizers["head_optimizer"])

    def accuracy(self, data: Samples) -> float:
        return accuracy(self.model, data.inputs, data.labels)

    def evaluate(self, data: Samples) -> dict[str, float]:
        """Accuracy, balanced accuracy, macro-F1 and AUROC on `data` (common.metrics)."""
        return evaluate(self.model, data.inputs, data.labels)


def target_temperature(codec: str, temperature: float) -> float:
    """The temperature the student matches the round's targets at: the query's, at which the teachers softened
    their probabilities, but 1 for votes (codec `vote`): their shares are counts, not softened probabilities, and
    matching one-hot rows at T > 1 with the T^2 factor only scales the gradient up (the student diverges)."""
    return 1.0 if codec == "vote" else temperature


def ensemble_accuracy(ensemble: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of the aggregated soft labels against the public samples' true labels."""
    return float((ensemble.argmax(axis=1) == labels).mean())
