"""What the classifier said about each training sample over a run: the training dynamics behind the noise report.

A model trained on noisy labels ends up fitting many of its wrong labels, so its final outputs partly confirm them.
Averaged over the epochs of training, the classifier's probabilities remember the epochs before it fitted them: a
sample whose given label the model came to fit only late, or never, gets a low mean probability for it (the
"confidence" of dataset cartography, Swayamdipta et al., EMNLP 2020; the idea of AUM, Pleiss et al., NeurIPS 2020).
The trainer records the epochs *before noise correction begins*: from then on the classifier learns the labels the
model itself corrected, and its probabilities confirm its own decisions (on a Fashion-MNIST development run with the
official schedule, the given label's mean probability ranked the label errors at AUROC 0.855 over the 4 epochs
before correction and 0.777 over all 30; BENCHMARKS.md). The record costs no extra pass: the classifier's outputs on
the training views are computed anyway, and one `index_add_` per step keeps their sums per sample on the device (no
host synchronisation). `evaluation.noise_report` averages the record with its neighbour vote as the class evidence of
its label decisions.

Memory is N x K floats, so the record is kept only for a map-style training set with a ``sample_id`` column and, by
default, at most `MAX_AUTO_ELEMENTS` entries (a user's own dataset; not the 2.4M x 1,000 of WebVision).
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from .distributed import is_distributed

SAMPLE_DYNAMICS_FILE = "sample_dynamics.safetensors"
# The largest N x K recorded without being asked: 2^27 float32 = 512 MiB of device memory (e.g. 1.3M samples x 100
# classes, or 134k x 1,000).
MAX_AUTO_ELEMENTS = 2**27


class SampleDynamics:
    """Per-sample sums of the classifier's softmax over the training steps that saw the sample.

    Attributes:
        probability_sum: (N, K) float32, summed softmax of the classifier on the sample's training views.
        visits: (N,) float32, the number of steps that saw the sample (exact to 2^24).
        labels: (N,) int64, the given label the sample was trained with (-1: never seen). The noise report checks
            it against its data's labels, so a record is never applied to another dataset or another order.
    """

    def __init__(self, num_samples: int, num_classes: int, device: torch.device | str | None = None):
        self.probability_sum = torch.zeros(num_samples, num_classes, device=device)
        self.visits = torch.zeros(num_samples, device=device)
        self.labels = torch.full((num_samples,), -1, dtype=torch.long, device=device)

    @property
    def num_samples(self) -> int:
        return self.probability_sum.shape[0]

    @property
    def num_classes(self) -> int:
        return self.probability_sum.shape[1]

    @torch.no_grad()
    def update(self, sample_ids: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add one batch: `sample_ids` (B,) in [0, N), `logits` (B, K) of the classifier, `labels` (B,) given."""
        sample_ids = sample_ids.to(self.visits.device)
        probabilities = logits.detach().float().softmax(1).to(self.probability_sum.device)  # (B, K)
        self.probability_sum.index_add_(0, sample_ids, probabilities)
        self.visits.index_add_(0, sample_ids, torch.ones_like(sample_ids, dtype=self.visits.dtype))
        self.labels.index_copy_(0, sample_ids, labels.to(self.labels.device))

    @torch.no_grad()
    def reduced(self) -> dict[str, torch.Tensor]:
        """The whole run's record, summed over processes (call it in every process: a collective when distributed);
        each process records only the samples it trained on."""
        tensors = {"probability_sum": self.probability_sum.clone(), "visits": self.visits.clone(),
                   "labels": self.labels.clone()}  # fmt: skip
        if is_distributed():
            dist.all_reduce(tensors["probability_sum"])
            dist.all_reduce(tensors["visits"])
            dist.all_reduce(tensors["labels"], op=dist.ReduceOp.MAX)  # -1 where a process never saw the sample
        return tensors

    def save(self, folder: str | os.PathLike, write: bool = True) -> None:
        """`reduced()` into `folder/SAMPLE_DYNAMICS_FILE` (every process calls it; those with `write` False only take
        part in the reduction)."""
        tensors = self.reduced()
        if write:
            save_file({name: t.cpu().contiguous() for name, t in tensors.items()},
                      os.path.join(folder, SAMPLE_DYNAMICS_FILE), metadata={"format": "pt"})  # fmt: skip

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str | None = None, main: bool = True):
        """A saved record (a file, or a folder holding `SAMPLE_DYNAMICS_FILE`). To continue it in several processes,
        load it with `main` True in one of them only: the others start from zero sums (the save sums them all)."""
        if os.path.isdir(path):
            path = os.path.join(path, SAMPLE_DYNAMICS_FILE)
        tensors = load_file(str(path))
        missing = {"probability_sum", "visits", "labels"} - set(tensors)
        if missing:
            raise ValueError(f"{path}: not a sample-dynamics record (missing {sorted(missing)})")
        record = cls(*tensors["probability_sum"].shape, device=device)
        record.labels.copy_(tensors["labels"])
        if main:
            record.probability_sum.copy_(tensors["probability_sum"])
            record.visits.copy_(tensors["visits"])
        return record

    def mean_probabilities(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n, K) float32 mean probabilities of the samples at `positions` (rows sum to 1; NaN where never seen) and
        their (n,) visit counts."""
        positions = torch.as_tensor(np.asarray(positions, dtype=np.int64))
        sums = self.probability_sum.cpu()[positions].double()
        visits = self.visits.cpu()[positions].double()
        mean = sums / visits[:, None]  # NaN for 0 / 0
        return mean.float().numpy(), visits.numpy()


__all__ = ["MAX_AUTO_ELEMENTS", "SAMPLE_DYNAMICS_FILE", "SampleDynamics"]
