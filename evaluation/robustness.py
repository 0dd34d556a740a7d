"""ImageNet-R / ImageNet-A: accuracy and calibration with the logits restricted to the datasets' 200 classes.

As in Hendrycks et al.'s evaluation of both datasets, the 1000 ImageNet logits are cut to the 200 classes present
(an index mask, in ImageNet index order) before the softmax; the dataset's class folders are WordNet ids, sorted,
so the i-th folder is the i-th kept logit.

Metrics (percent):
- `accuracy`: top-1 over the 200 classes.
- `rms_calibration_error`: Hendrycks et al.'s RMS calibration error (ImageNet-A/-R papers, `calib_err` with
  `p="2", beta=100`): sort by confidence, *adaptive* bins of 100 consecutive samples (the last bin takes the
  remainder), `sqrt(sum_b |b|/N * (mean confidence_b - accuracy_b)^2)`. Computed here in numpy; NOT torchmetrics'
  `norm="l2"`, which uses equal-width bins. The reference code loops over all bins but the last (the most confident
  one): `include_last_bin=False` reproduces that.
- `ece`: expected calibration error, torchmetrics `MulticlassCalibrationError(n_bins=15, norm="l1")` (equal-width).

The 200 classes (`--class_subset FILE`): one entry per line, either "wnid index" (index into the model's 1000
logits), or "wnid" (then `--imagenet_classes FILE` lists the 1000 wnids in logit order, one per line, first token;
`LOC_synset_mapping.txt` works), or an integer index (then the i-th smallest index is paired with the i-th sorted
folder, which holds because ImageNet's class indices follow sorted wnids).

    python -m evaluation.robustness --model_name_or_path DIR --dataset imagenet-r --data_dir imagenet-r \
        --class_subset imagenet_r_wnids.txt --imagenet_classes LOC_synset_mapping.txt
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchmetrics.classification import MulticlassCalibrationError

from training.data.image_datasets import image_dataset
from training.data.transforms import transforms_from_config

from .classification import topk_accuracy
from .features import FeatureOptions, add_model_arguments, extract_features, load_model, results_dir, save_eval_results

DATASET_CARDS = {
    "imagenet-r": ("ImageNet-R", "imagenet-r"),
    "imagenet-a": ("ImageNet-A", "imagenet-a"),
}


def rms_calibration_error(
    confidence: np.ndarray, correct: np.ndarray, bin_size: int = 100, include_last_bin: bool = True
) -> float:
    """Hendrycks et al.'s RMS calibration error in [0, 1] with adaptive (equal-count) bins.

    Args:
        confidence: (N,) probability of the predicted class.
        correct: (N,) 1 where the prediction is right.
        bin_size: samples per bin (the reference's `beta`); the last bin also takes the N % bin_size rest.
        include_last_bin: False reproduces the reference code, whose loop skips the last bin.
    """
    order = np.argsort(confidence, kind="stable")
    confidence, correct = np.asarray(confidence, np.float64)[order], np.asarray(correct, np.float64)[order]
    n = len(confidence)
    starts = np.arange(max(n // bin_size, 1)) * bin_size
    ends = np.append(starts[1:], n)
    if not include_last_bin:
        starts, ends = starts[:-1], ends[:-1]
    squared = sum(
        (e - s) / n * (confidence[s:e].mean() - correct[s:e].mean()) ** 2 for s, e in zip(starts, ends, strict=True)
    )
    return float(np.sqrt(squared))


def robustness_metrics(
    logits: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, bin_size: int = 100, ece_bins: int = 15
) -> dict[str, float]:
    """Accuracy, RMS calibration error and ECE (all %) of (N, C) logits already restricted to the C classes."""
    probabilities = torch.softmax(torch.as_tensor(logits).double(), dim=1)
    labels = torch.as_tensor(labels).long()
    confidence, prediction = probabilities.max(dim=1)
    correct = (prediction == labels).numpy()
    ece = MulticlassCalibrationError(num_classes=probabilities.shape[1], n_bins=ece_bins, norm="l1")
    return {
        "accuracy": topk_accuracy(probabilities, labels, (1,))["top1"],
        "rms_calibration_error": 100.0 * rms_calibration_error(confidence.numpy(), correct, bin_size),
        "ece": 100.0 * float(ece(probabilities.float(), labels)),
    }


def read_class_subset(path: str | Path) -> list[str] | dict[str, int] | list[int]:
    """Reads a class-subset file: lines "wnid index" -> dict, "wnid" -> list of wnids, "index" -> list of ints."""
    rows = [line.split() for line in Path(path).read_text().splitlines() if line.strip()]
    if all(len(row) >= 2 and row[1].isdigit() for row in rows):
        return {row[0]: int(row[1]) for row in rows}
    if all(row[0].isdigit() for row in rows):
        return [int(row[0]) for row in rows]
    return [row[0] for row in rows]


def read_imagenet_classes(path: str | Path) -> list[str]:
    """The 1000 wnids in logit order: first token of each line (`synsets.txt`, `LOC_synset_mapping.txt`)."""
    return [line.split()[0] for line in Path(path).read_text().splitlines() if line.strip()]


def subset_logit_indices(
    folder_wnids: Sequence[str],
    class_subset: Sequence[str] | Sequence[int] | Mapping[str, int],
    imagenet_classes: Sequence[str] | None = None,
) -> np.ndarray:
    """Index into the model logits of each dataset class, in the dataset's (sorted folder) label order.

    Args:
        folder_wnids: the dataset's class folders, sorted (its label order).
        class_subset: {wnid: logit index}, or wnids (needs `imagenet_classes`), or logit indices (paired in
            sorted order with `folder_wnids`).
        imagenet_classes: all wnids in logit order.

    Returns:
        (C,) int64 indices: `logits[:, indices]` are the restricted logits, column i for label i.
    """
    folder_wnids = sorted(folder_wnids)
    if isinstance(class_subset, Mapping):
        mapping = dict(class_subset)
    elif all(isinstance(c, (int, np.integer)) for c in class_subset):
        if len(class_subset) != len(folder_wnids):
            raise ValueError(f"{len(class_subset)} class indices for {len(folder_wnids)} class folders")
        return np.asarray(sorted(int(c) for c in class_subset), dtype=np.int64)
    else:
        if imagenet_classes is None:
            raise ValueError("wnids without indices need `imagenet_classes` (the wnid of every logit, in order)")
        position = {wnid: i for i, wnid in enumerate(imagenet_classes)}
        unknown = [wnid for wnid in class_subset if wnid not in position]
        if unknown:
            raise ValueError(f"class subset wnids not among the {len(position)} ImageNet classes: {unknown[:5]}")
        mapping = {wnid: position[wnid] for wnid in class_subset}
    missing = [wnid for wnid in folder_wnids if wnid not in mapping]
    if missing:  # user data that disagrees with the subset file: a ValueError, one line through modeling_mopro.cli
        raise ValueError(f"class folders not in the class subset: {missing[:5]}")
    return np.asarray([mapping[wnid] for wnid in folder_wnids], dtype=np.int64)


@dataclass(frozen=True)
class RobustnessOptions(FeatureOptions):
    """`evaluate_robustness`'s options: samples per bin of the RMS calibration error, and how the model runs."""

    bin_size: int = 100


def evaluate_robustness(
    model,
    data_dir: str | Path,
    class_subset: Sequence[str] | Sequence[int] | Mapping[str, int],
    options: RobustnessOptions,
    imagenet_classes: Sequence[str] | None = None,
) -> dict[str, float]:
    """Accuracy / RMS calibration error / ECE (%) of a MoPro model on an ImageNet-R/-A style folder of wnids."""
    model = load_model(model, options.device)
    folders = sorted(p.name for p in Path(data_dir).iterdir() if p.is_dir())
    indices = subset_logit_indices(folders, class_subset, imagenet_classes)
    num_labels = model.config.num_labels
    if len(indices) and (indices.min() < 0 or indices.max() >= num_labels):
        raise ValueError(
            f"the class subset maps to logit {int(indices.max() if indices.max() >= num_labels else indices.min())}, "
            f"outside the model's {num_labels} classes"
        )
    dataset = image_dataset("imagefolder", data_dir, None, transforms_from_config(model.config), class_names=folders)
    features = extract_features(model, dataset, ("logits",), desc="robustness", **options.extraction())
    if features.logits is None:
        raise ValueError("the model has no classifier (a MoProModel folder)")
    metrics = robustness_metrics(features.logits[:, indices], features.labels, options.bin_size)
    return {**metrics, "num_samples": len(features)}


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--dataset", default="imagenet-r", help="imagenet-r, imagenet-a or any name (result key)")
    parser.add_argument("--data_dir", required=True, help="folder of wnid class folders")
    parser.add_argument("--class_subset", required=True, help="file of the 200 classes (see module doc)")
    parser.add_argument("--imagenet_classes", default=None, help="file of the 1000 wnids in logit order")
    parser.add_argument("--bin_size", type=int, default=100)
    args = parser.parse_args(argv)

    imagenet_classes = read_imagenet_classes(args.imagenet_classes) if args.imagenet_classes else None
    subset, options = read_class_subset(args.class_subset), RobustnessOptions.from_args(args)
    metrics = evaluate_robustness(args.model_name_or_path, args.data_dir, subset, options, imagenet_classes)
    name, dataset_type = DATASET_CARDS.get(args.dataset, (args.dataset, args.dataset))
    key = args.dataset.replace("-", "_")
    path = save_eval_results(results_dir(args), "robustness", metrics, name, dataset_type, key)
    print(f"{metrics} -> {path}")
    return metrics


__all__ = [
    "RobustnessOptions",
    "evaluate_robustness",
    "read_class_subset",
    "read_imagenet_classes",
    "rms_calibration_error",
    "robustness_metrics",
    "subset_logit_indices",
]

if __name__ == "__main__":
    from modeling_mopro.cli import run_command

    run_command(main)
