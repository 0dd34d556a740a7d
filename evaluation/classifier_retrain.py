"""Classifier retraining (cRT) on the cleaned labels (official `classifier_retrain.py`).

The training set is `pseudo_label.json` (`{"images": [relative path, ...], "labels": [int, ...]}`, written by
`evaluation.noise_report` or the official `noise_cleaning.py`). Official recipe (all configurable): 16 epochs, SGD
(momentum 0.9, weight decay 0), learning rate 0.01 multiplied by 0.1 at epochs 5 and 10, global batch 256 with
`drop_last`, RandomResizedCrop(224, scale 0.2-1) + flip. By default only the classifier trains, starting from the
MoPro classifier, with the backbone frozen in eval mode; `--finetune` also trains the backbone.

Class-balanced sampling (official `dataloader_balance.py` "repeat"): a sample of class c is drawn with weight
`1 / sqrt(n_c)`, so a class is seen in proportion to `sqrt(n_c)`; an epoch has as many draws as the set has
samples. The official code makes `floor(10 * sqrt(n_max / n_c))` copies of every sample and keeps the first N of a
shuffle (draws without replacement from those copies); here the N draws are independent with the exact weights,
the same per-draw probabilities up to that floor.

Evaluation after training: WebVision val and ImageNet val (both optional), top-1/top-5 with the test view, of the
last epoch (the official script evaluates every epoch and keeps no best). 16 epochs: the official `--epochs 15`
(L46) drives `range(start_epoch, epochs + 1)` (L229), which runs epochs 0-15, the last six at lr 1e-4.

    python -m evaluation.classifier_retrain --model_name_or_path DIR --train_data_dir WEBVISION_ROOT \
        --annotation DIR/pseudo_label.json --webvision_dir WEBVISION_ROOT --imagenet_dir IMAGENET/val \
        --output_dir runs/crt
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import WeightedRandomSampler

from training.data.image_datasets import (
    ImageLabelDataset,
    apply_pseudo_labels,
    collate_without_index,
    image_dataset,
    pseudo_label_dataset,
    webvision_val_dataset,
)
from training.data.transforms import transforms_from_config

from .classification import DATASET_CARDS, ClassificationOptions, evaluate_classification
from .features import save_eval_results
from .finetune import StepDecayTrainer, TrainingRecipe, add_schedule_arguments, load_for_training


def class_balanced_weights(labels: np.ndarray | Sequence[int], num_classes: int | None = None) -> np.ndarray:
    """(K,) per-class sampling weight `1 / sqrt(n_c)` of every sample of class c (0 for absent classes)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes or 0).astype(np.float64)
    weights = np.zeros_like(counts)
    present = counts > 0
    weights[present] = 1.0 / np.sqrt(counts[present])
    return weights


class ClassBalancedSampler(WeightedRandomSampler):
    """torch's `WeightedRandomSampler` (`num_samples` independent draws, sample i with probability
    ∝ `1 / sqrt(n_{y_i})`), its generator seeded with `seed + epoch` at every pass.

    The draws depend only on `seed` and the epoch (`set_epoch`, else the count of iterations), so every process of
    a distributed run draws the same sequence, which Accelerate then splits into per-process batches.

    Args:
        labels: (N,) class of every sample.
        num_samples: Draws per epoch (defaults to N, as the official sampler).
        seed: Base seed.
    """

    def __init__(self, labels: np.ndarray | Sequence[int], num_samples: int | None = None, seed: int = 0) -> None:
        labels = np.asarray(labels, dtype=np.int64)
        weights = class_balanced_weights(labels)[labels]
        super().__init__(weights, num_samples or len(labels), replacement=True, generator=torch.Generator())
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        self.generator.manual_seed(self.seed + self.epoch)
        self.epoch += 1  # a different draw next time, unless the trainer sets the epoch explicitly
        return super().__iter__()


@dataclass
class ClassifierRetrainOptions(TrainingRecipe):
    """Official `classifier_retrain.py` defaults: 16 epochs (official --epochs 15 with range(epochs + 1)), lr 0.01
    times 0.1 at epochs 5 and 10.

    Attributes:
        finetune: Also train the backbone (else only the classifier, the backbone frozen in eval mode).
        reinit_classifier: Start from a new classifier (N(0, 0.01) weights, zero bias) instead of MoPro's.
    """

    epochs: int = 16
    learning_rate: float = 0.01
    milestones: tuple[int, ...] = (5, 10)
    gamma: float = 0.1
    finetune: bool = False
    reinit_classifier: bool = False


def classifier_retrain(
    model_name_or_path: str | os.PathLike,
    train_dataset: ImageLabelDataset,
    eval_datasets: Mapping[str, ImageLabelDataset],
    output_dir: str | os.PathLike,
    options: ClassifierRetrainOptions | None = None,
) -> dict[str, dict[str, float]]:
    """Retrains the classifier (or the whole network with `options.finetune`) on the pseudo-labelled set.

    Args:
        train_dataset: The cleaned set (pseudo labels) with the training augmentation.
        eval_datasets: name -> evaluation set (test view), e.g. {"webvision": ..., "imagenet": ...}.
        options: The recipe (official defaults).

    Returns:
        name -> {"top1", "top5", "num_samples", "train_samples"} (accuracies in %); empty off the main process.
    """
    options = options or ClassifierRetrainOptions()
    from transformers import AutoConfig

    import modeling_mopro  # noqa: F401

    num_labels = AutoConfig.from_pretrained(model_name_or_path).num_labels
    if int(train_dataset.labels.max()) >= num_labels:
        raise ValueError(
            f"pseudo labels reach {int(train_dataset.labels.max())} but the model has {num_labels} classes"
        )
    model = load_for_training(model_name_or_path, num_labels)
    if not options.finetune:
        model.mopro.requires_grad_(False)
    if options.reinit_classifier:
        torch.nn.init.normal_(model.classifier.weight, std=0.01)
        torch.nn.init.zeros_(model.classifier.bias)
    trainer = StepDecayTrainer(
        model=model,
        args=options.training_arguments(output_dir, drop_last=True),
        train_dataset=train_dataset,
        data_collator=collate_without_index,
        milestones=options.milestones,
        gamma=options.gamma,
        train_sampler=ClassBalancedSampler(train_dataset.labels, seed=options.seed),
        frozen_backbone=not options.finetune,
    )
    trainer.train()
    if options.save_model:
        trainer.save_model(str(output_dir))
    if not trainer.is_world_process_zero():
        return {}
    results, evaluation = {}, ClassificationOptions(batch_size=options.batch_size, num_workers=options.num_workers)
    for name, dataset in eval_datasets.items():
        metrics = evaluate_classification(trainer.model, dataset, options=evaluation)
        results[name] = {**metrics, "train_samples": len(train_dataset)}
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="saved MoPro folder")
    parser.add_argument("--output_dir", required=True, help="where the retrained model goes")
    parser.add_argument("--results_dir", default=None, help="where eval_*.json goes (default: the model folder)")
    parser.add_argument("--annotation", required=True, help="pseudo_label.json")
    parser.add_argument("--train_data_dir", required=True, help="root of the image paths (or a `datasets` folder)")
    parser.add_argument("--train_data_format", choices=("files", "imagefolder", "hf"), default="files")
    parser.add_argument("--train_split", default="train")
    parser.add_argument("--webvision_dir", default=None, help="WebVision root, for the val set")
    parser.add_argument("--imagenet_dir", default=None, help="ImageNet val image folder")
    parser.add_argument("--finetune", action="store_true", help="also train the backbone")
    parser.add_argument("--reinit_classifier", action="store_true")
    add_schedule_arguments(parser, ClassifierRetrainOptions())
    args = parser.parse_args(argv)

    from transformers import AutoConfig

    import modeling_mopro  # noqa: F401

    config = AutoConfig.from_pretrained(args.model_name_or_path)
    train_view = transforms_from_config(config, train=True, crop_scale=(0.2, 1.0))
    if args.train_data_format == "files":
        train = pseudo_label_dataset(args.train_data_dir, args.annotation, train_view)
    else:
        full = image_dataset(args.train_data_format, args.train_data_dir, args.train_split, train_view)
        train = apply_pseudo_labels(full, args.annotation)
    test_view = transforms_from_config(config)
    evals = {}
    if args.webvision_dir:
        evals["webvision"] = webvision_val_dataset(args.webvision_dir, test_view, config.num_labels)
    if args.imagenet_dir:
        evals["imagenet"] = image_dataset("imagefolder", args.imagenet_dir, None, test_view)
    options = ClassifierRetrainOptions.from_flags(args)
    results = classifier_retrain(args.model_name_or_path, train, evals, args.output_dir, options)
    for name, metrics in results.items():
        dataset_name, dataset_type = DATASET_CARDS.get(name, (name, name))
        path = save_eval_results(
            args.results_dir or args.model_name_or_path, "classifier_retrain", metrics,
            f"{dataset_name}, classifier retrained on cleaned labels", dataset_type, name,
        )  # fmt: skip
        print(f"{name}: {metrics} -> {path}")
    return results


__all__ = ["ClassBalancedSampler", "ClassifierRetrainOptions", "class_balanced_weights", "classifier_retrain"]

if __name__ == "__main__":
    from modeling_mopro.cli import run_command

    run_command(main)
