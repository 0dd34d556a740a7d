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

import numpy as np
import torch
from torch.utils.data import Dataset
from torchmetrics.classification import MulticlassAccuracy

from training.data.image_datasets import (
    add_dataset_arguments,
    check_class_names,
    dataset_from_arguments,
    result_key,
)
from training.data.transforms import transforms_from_config

from .features import add_model_arguments, extract_features, load_model, results_dir, save_eval_results

# dataset key -> (name, type) written to the result file.
DATASET_CARDS = {
    "webvision": ("WebVision 1.0 (val)", "webvision"),
    "imagenet": ("ImageNet (ILSVRC2012 val)", "imagenet-1k"),
}


def topk_accuracy(logits: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, top_k: Sequence[int] = (1, 5)):
    """Top-k accuracy in percent (torchmetrics `MulticlassAccuracy(top_k=k, average="micro")`).

    Args:
        logits: (N, K) scores.
        labels: (N,) integer labels.
        top_k: The k values; those above K are clipped to K.

    Returns:
        `{"top{k}": accuracy in %}` for each k.
    """
    logits, labels = torch.as_tensor(logits).float(), torch.as_tensor(labels).long()
    num_classes = logits.shape[1]
    results = {}
    for k in top_k:
        metric = MulticlassAccuracy(num_classes=num_classes, top_k=min(k, num_classes), average="micro")
        results[f"top{k}"] = 100.0 * float(metric(logits, labels))
    return results


def evaluate_classification(
    model,
    dataset: Dataset,
    top_k: Sequence[int] = (1, 5),
    batch_size: int = 256,
    num_workers: int = 8,
    device: str | None = None,
    amp: bool = False,
) -> dict[str, float]:
    """Classifier top-k accuracy (%) of a MoPro model (or folder) on an evaluation dataset; adds `num_samples` and
    `num_skipped_samples` (undecodable images, logged with their ids, not scored).

    Raises:
        ValueError: The dataset's class names are not the model's labels (`check_class_names`).
    """
    model = load_model(model, device)
    check_class_names(dataset, model.config)
    features = extract_features(
        model, dataset, ("logits",), batch_size, num_workers, device, amp, desc="classification"
    )
    if features.logits is None:
        raise ValueError("the model has no classifier (a MoProModel folder); classification needs one")
    return {
        **topk_accuracy(features.logits, features.labels, top_k),
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
    metrics = evaluate_classification(
        model, dataset, batch_size=args.batch_size, num_workers=args.num_workers, device=args.device, amp=args.amp
    )
    name, dataset_type = DATASET_CARDS.get(args.dataset, (args.dataset, args.dataset))
    path = save_eval_results(
        results_dir(args), "classification", metrics, args.dataset_name or name, dataset_type, args.dataset
    )
    print(f"{metrics} -> {path}")
    return metrics


__all__ = ["evaluate_classification", "topk_accuracy"]

if __name__ == "__main__":
    from modeling_mopro.cli import run_command

    run_command(main)
