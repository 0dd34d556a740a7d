"""Top-1 / top-5 accuracy of the classifier on WebVision val and ImageNet val (official `train.py` / cRT `test`).

WebVision 1.0's 1000 classes are ImageNet's, in the same (sorted WordNet id) order, so ImageNet val as an image
folder (`val/<wnid>/*.JPEG`, or the official `imagenet/val/<0..999>/` layout) needs no class mapping.
Images go through the official test view (resize 256, centre-crop 224 at image_size 224).

    python -m evaluation.classification --model_name_or_path DIR --dataset webvision --data_dir WEBVISION_ROOT
    python -m evaluation.classification --model_name_or_path DIR --dataset imagenet --data_dir IMAGENET/val
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset
from torchmetrics.classification import MulticlassStatScores

from training.data.image_datasets import (
    add_dataset_arguments,
    check_class_names,
    dataset_from_arguments,
    result_key,
)
from training.data.transforms import transforms_from_config

from .features import FeatureOptions, add_model_arguments, extract_features, load_model, results_dir, save_eval_results

# dataset key -> (name, type) written to the result file.
DATASET_CARDS = {
    "webvision": ("WebVision 1.0 (val)", "webvision"),
    "imagenet": ("ImageNet (ILSVRC2012 val)", "imagenet-1k"),
}


def topk_accuracy(
    scores: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, top_k: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """The project's one accuracy: top-k accuracy in percent, from torchmetrics' `MulticlassStatScores` counts (micro),
    divided in float64 so that a figure is the exact share of correct samples (every protocol, kNN, the SVMs).

    Args:
        scores: (N, K) scores (logits, probabilities, vote shares; ties go to the smaller class index), or (N,)
            predicted class ids (top-1 only).
        labels: (N,) integer labels.
        top_k: The k values; those above K are clipped to K.

    Returns:
        `{"top{k}": accuracy in %}` for each k.
    """
    scores, labels = torch.as_tensor(scores), torch.as_tensor(labels).long()
    if len(labels) == 0 or scores.shape[0] != len(labels):
        raise ValueError(f"accuracy needs a prediction per label (N > 0): {tuple(scores.shape)}, {len(labels)} labels")
    if scores.ndim == 1:  # class ids: as many classes as the largest id names
        scores, num_classes = scores.long(), int(max(scores.max(), labels.max())) + 1
    else:
        scores, num_classes = (scores if scores.is_floating_point() else scores.float()), scores.shape[1]
    results = {}
    for k in top_k:
        counts = MulticlassStatScores(num_classes=num_classes, top_k=min(k, num_classes), average="micro")
        true_positives, _, _, _, support = counts(scores, labels).tolist()
        results[f"top{k}"] = 100.0 * (true_positives / support)
    return results


@dataclass(frozen=True)
class ClassificationOptions(FeatureOptions):
    """`evaluate_classification`'s options: the k of the top-k accuracies, and how the model runs."""

    top_k: tuple[int, ...] = (1, 5)


def evaluate_classification(model, dataset: Dataset, options: ClassificationOptions) -> dict[str, float]:
    """Classifier top-k accuracy (%) of a MoPro model (or folder) on an evaluation dataset; adds `num_samples` and
    `num_skipped_samples` (undecodable images, logged with their ids, not scored).

    Raises:
        ValueError: The dataset's class names are not the model's labels (`check_class_names`).
    """
    model = load_model(model, options.device)
    check_class_names(dataset, model.config)
    features = extract_features(model, dataset, ("logits",), desc="classification", **options.extraction())
    if features.logits is None:
        raise ValueError("the model has no classifier (a MoProModel folder); classification needs one")
    return {
        **topk_accuracy(features.logits, features.labels, options.top_k),
        "num_samples": len(features),
        "num_skipped_samples": len(features.skipped_ids),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    add_dataset_arguments(parser)
    parser.add_argument(
        "--dataset", default=None, help="result key: webvision, imagenet or any name (required unless WebVision val)"
    )
    parser.add_argument("--dataset_name", default=None, help="human-readable dataset name for the result file")
    args = parser.parse_args(argv)
    args.dataset = result_key(args)  # before any work: a result must say which data it was measured on

    model = load_model(args.model_name_or_path, args.device)
    dataset, _ = dataset_from_arguments(args, transforms_from_config(model.config))
    metrics = evaluate_classification(model, dataset, ClassificationOptions.from_args(args))
    name, dataset_type = DATASET_CARDS.get(args.dataset, (args.dataset, args.dataset))
    path = save_eval_results(
        results_dir(args), "classification", metrics, args.dataset_name or name, dataset_type, args.dataset
    )
    print(f"{metrics} -> {path}")
    return metrics


__all__ = ["ClassificationOptions", "evaluate_classification", "topk_accuracy"]

if __name__ == "__main__":
    from modeling_mopro.cli import run_command

    run_command(main)
