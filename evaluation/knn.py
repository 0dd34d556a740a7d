"""Weighted k-nearest-neighbour accuracy on the MoPro embeddings: a cheap check during and after training.

The weighted vote of InstDisc (Wu et al., 2018) as used by DINO's `eval_knn.py`: cosine similarity to every
training embedding, the k most similar vote for their class with weight `exp(similarity / T)` (k=200, T=0.1);
the prediction is the class with the largest total. `weighting="majority"` gives every neighbour weight 1
(plain majority vote, k=20 is usual). Ties go to the smallest class index.

    python -m evaluation.knn --model_name_or_path DIR --train_data_dir TRAIN --data_dir VAL [--feature pooled]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from modeling_mopro.cli import positive_int
from modeling_mopro.noise_correction import neighbour_label_vote
from training.data.image_datasets import (
    ImageLabelDataset,
    add_dataset_arguments,
    check_same_classes,
    dataset_from_arguments,
    result_key,
)
from training.data.transforms import transforms_from_config

from .classification import topk_accuracy
from .features import FeatureOptions, add_model_arguments, extract_features, load_model, results_dir, save_eval_results

WEIGHTINGS = ("temperature", "majority")


@torch.no_grad()
def knn_class_scores(
    train_features: np.ndarray | torch.Tensor,
    train_labels: np.ndarray | torch.Tensor,
    test_features: np.ndarray | torch.Tensor,
    k: int = 200,
    temperature: float = 0.1,
    weighting: str = "temperature",
    num_classes: int | None = None,
    batch_size: int = 1024,
) -> torch.Tensor:
    """Per-class vote shares of the k nearest (cosine) training samples of every test sample
    (`modeling_mopro.neighbour_label_vote`, the vote the noise report and the `queue_vote` training rule use).

    Args:
        train_features: (N, D) features (L2-normalised here).
        train_labels: (N,) integer labels.
        test_features: (M, D) features, same space.
        k: neighbours (clipped to N).
        temperature: T of the `exp(similarity / T)` weights.
        weighting: "temperature" (InstDisc / DINO) or "majority" (weight 1).
        num_classes: defaults to `max(train_labels) + 1`.
        batch_size: test rows per similarity block (memory: batch_size x N floats).

    Returns:
        (M, num_classes) float vote shares, each row summing to 1 (the weights normalised over the k neighbours:
        the same argmax as InstDisc's unnormalised totals).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; choose from {WEIGHTINGS}")
    train = F.normalize(torch.as_tensor(train_features).float(), dim=1)
    test = F.normalize(torch.as_tensor(test_features).float().to(train.device), dim=1)
    labels = torch.as_tensor(train_labels).long().to(train.device)
    num_classes = num_classes or int(labels.max()) + 1
    k = min(k, train.shape[0])
    scores = []
    for start in range(0, test.shape[0], batch_size):
        similarity, neighbours = (test[start : start + batch_size] @ train.T).topk(k, dim=1)  # (B, k)
        vote_temperature = temperature if weighting == "temperature" else None  # None: a majority vote
        scores.append(neighbour_label_vote(similarity, labels[neighbours], num_classes, vote_temperature))
    return torch.cat(scores) if scores else torch.zeros(0, num_classes)


def knn_accuracy(
    train_features: np.ndarray | torch.Tensor,
    train_labels: np.ndarray | torch.Tensor,
    test_features: np.ndarray | torch.Tensor,
    test_labels: np.ndarray | torch.Tensor,
    k: int = 200,
    temperature: float = 0.1,
    weighting: str = "temperature",
    num_classes: int | None = None,
) -> float:
    """Top-1 kNN accuracy in percent (see `knn_class_scores`; `topk_accuracy` of the vote shares)."""
    test_labels = torch.as_tensor(test_labels).long()
    if num_classes is None:
        num_classes = int(max(torch.as_tensor(train_labels).max(), test_labels.max())) + 1
    scores = knn_class_scores(train_features, train_labels, test_features, k, temperature, weighting, num_classes)
    return topk_accuracy(scores.cpu(), test_labels, (1,))["top1"]


@dataclass(frozen=True)
class KnnOptions(FeatureOptions):
    """`evaluate_knn`'s options: which feature, the weighted vote's k and T, the majority vote's k (0 or None: no
    majority-vote accuracy), and how the model runs."""

    feature: str = "embeddings"  # or "pooled"
    k: int = 200
    temperature: float = 0.1
    majority_k: int | None = 20


def evaluate_knn(
    model, train_dataset: ImageLabelDataset, test_dataset: ImageLabelDataset, options: KnnOptions
) -> dict[str, float]:
    """Extracts `options.feature` of both sets and returns the weighted kNN accuracy (%) and, unless `majority_k` is
    0 or None, the plain majority-vote accuracy with `majority_k` neighbours."""
    feature, k, majority_k = options.feature, options.k, options.majority_k
    for name, value in (("k", k), ("majority_k", majority_k)):
        # `knn_class_scores` would take all of a smaller set: the result, filed under k, would be another protocol.
        if value and value > len(train_dataset):
            raise ValueError(
                f"--{name} {value} is more than the {len(train_dataset)} training samples; give --{name} at most "
                f"{len(train_dataset)}"
            )
    model = load_model(model, options.device)
    train = extract_features(model, train_dataset, (feature,), desc="knn train", **options.extraction())
    test = extract_features(model, test_dataset, (feature,), desc="knn test", **options.extraction())
    train_x, test_x = getattr(train, feature), getattr(test, feature)
    metrics = {f"knn_top1_k{k}": knn_accuracy(train_x, train.labels, test_x, test.labels, k, options.temperature)}
    if majority_k:
        metrics[f"knn_majority_top1_k{majority_k}"] = knn_accuracy(
            train_x, train.labels, test_x, test.labels, majority_k, weighting="majority"
        )
    return metrics


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    add_dataset_arguments(parser, prefix="train_")
    add_dataset_arguments(parser)
    parser.add_argument("--dataset", default=None, help="result key (test set; required unless it is WebVision val)")
    parser.add_argument("--dataset_name", default=None)
    parser.add_argument("--feature", choices=("embeddings", "pooled"), default="embeddings")
    parser.add_argument("--k", type=positive_int, default=200)
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument("--majority_k", type=int, default=20, help="0 disables the majority-vote accuracy")
    args = parser.parse_args(argv)
    args.dataset = result_key(args)  # before any work: a result must say which data it was measured on

    model = load_model(args.model_name_or_path, args.device)
    transform = transforms_from_config(model.config)
    train, _ = dataset_from_arguments(args, transform, prefix="train_", default_split="train")
    test, _ = dataset_from_arguments(args, transform)
    check_same_classes(train, test)  # neighbours vote with the training labels: both sides must mean the same
    metrics = evaluate_knn(model, train, test, KnnOptions.from_args(args))
    name = args.dataset_name or f"{args.dataset} (kNN on {args.feature})"
    path = save_eval_results(results_dir(args), "knn", metrics, name, args.dataset, args.dataset)
    print(f"{metrics} -> {path}")
    return metrics


__all__ = ["KnnOptions", "evaluate_knn", "knn_accuracy", "knn_class_scores"]

if __name__ == "__main__":
    from modeling_mopro.cli import run_command

    run_command(main)
