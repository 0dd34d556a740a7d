"""Low-shot linear SVMs on frozen, L2-normalised pooled features (official `lowshot_svm.py`).

For k in {1, 2, 4, 8, 16} images per class and 5 sampled training sets each, a `LinearSVC(C=0.5)` is trained on
`x / (||x|| + 1e-5)` of the pooled backbone features (test view, no augmentation) and scored on the full test set:
- VOC07 (multi-label): one binary SVM per class (labels +-1, difficult counted as negative as in the official
  script; `class_weight={1: 2, -1: 1}`, squared hinge, L2, dual, tol 1e-4, max_iter 2000); mean AP over the
  20 classes. A low-shot set takes, per class, k random images having that class (so an image can be taken
  twice, as in the official `convert_low_shot`).
- Places205: one multi-class `LinearSVC` (liblinear one-vs-rest, default class weights, tol 1e-4, dual,
  max_iter 2000); top-1 accuracy. k random images per class.
Results are mean and (population) std over the runs, in percent.

AP definitions (`--ap_definition`): "sklearn" (default): `sklearn.metrics.average_precision_score`, the
non-interpolated step-wise area; "voc07_11point": mean over recall levels {0, 0.1, ..., 1} of the best precision at
recall >= level (VOC2007 devkit); "voc_interpolated": area under the monotone precision envelope at every recall
change (VOC2010+ devkit), which is what the official `lowshot_svm.py` computes, so use it for parity with the
published numbers.

    python -m evaluation.lowshot_svm --model_name_or_path DIR --task voc07 --data_dir VOC_ROOT
    python -m evaluation.lowshot_svm --model_name_or_path DIR --task places205 --data_dir PLACES_ROOT
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import average_precision_score
from sklearn.svm import LinearSVC

from modeling_mopro.cli import positive_int
from training.data.image_datasets import ImageLabelDataset, places205_dataset, voc07_dataset
from training.data.transforms import transforms_from_config

from .classification import topk_accuracy
from .features import (
    FeatureOptions,
    add_model_arguments,
    extract_features,
    l2_normalize,
    load_model,
    results_dir,
    save_eval_results,
)

TASKS = ("voc07", "places205")
AP_DEFINITIONS = ("sklearn", "voc07_11point", "voc_interpolated")
DEFAULT_SHOTS = (1, 2, 4, 8, 16)
DATASET_CARDS = {"voc07": ("PASCAL VOC2007 (low-shot linear SVM)", "voc2007"), "places205": ("Places205", "places205")}


@dataclass(frozen=True)
class LowShotOptions(FeatureOptions):
    """The protocol's options: k images per class (`shots`), `runs` sampled sets per k drawn with `seed`, the SVM's C
    (`cost`, official 0.5), VOC07's AP definition and difficult rule (module docstring), and how the model runs."""

    shots: tuple[int, ...] = DEFAULT_SHOTS
    runs: int = 5
    cost: float = 0.5
    seed: int = 0
    ap_definition: str = "sklearn"
    ignore_difficult: bool = False


# ---------------------------------------------------------------------------------------------------- AP
def _ranked_hits(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall after each sample, by decreasing score. y_true: (N,) bool; scores: (N,)."""
    hits = y_true[np.argsort(-scores, kind="stable")].astype(np.float64)
    true_positives = np.cumsum(hits)
    precision = true_positives / np.arange(1, len(hits) + 1)
    recall = true_positives / max(hits.sum(), 1.0)
    return precision, recall


def voc07_11point_ap(y_true: np.ndarray, scores: np.ndarray) -> float:
    """VOC2007 11-point interpolated AP: mean over t in {0, 0.1, ..., 1} of max precision at recall >= t."""
    precision, recall = _ranked_hits(np.asarray(y_true) > 0, np.asarray(scores))
    levels = np.linspace(0, 1, 11)
    return float(np.mean([precision[recall >= t].max() if (recall >= t).any() else 0.0 for t in levels]))


def voc_interpolated_ap(y_true: np.ndarray, scores: np.ndarray) -> float:
    """All-point interpolated AP (VOC2010+, official `lowshot_svm.py`): the area under the precision envelope
    `p_interp(r) = max_{r' >= r} p(r')`, summed over the recall changes."""
    precision, recall = _ranked_hits(np.asarray(y_true) > 0, np.asarray(scores))
    recall = np.concatenate([[0.0], recall, [1.0]])
    envelope = np.maximum.accumulate(np.concatenate([[0.0], precision, [0.0]])[::-1])[::-1]
    changes = np.nonzero(recall[1:] != recall[:-1])[0] + 1
    return float(np.sum((recall[changes] - recall[changes - 1]) * envelope[changes]))


def average_precision(y_true: np.ndarray, scores: np.ndarray, definition: str = "sklearn") -> float:
    """AP of one class in [0, 1]; `y_true > 0` are the positives. See the module docstring for the definitions."""
    if definition == "sklearn":
        return float(average_precision_score(np.asarray(y_true) > 0, scores))
    if definition == "voc07_11point":
        return voc07_11point_ap(y_true, scores)
    if definition == "voc_interpolated":
        return voc_interpolated_ap(y_true, scores)
    raise ValueError(f"unknown AP definition {definition!r}; choose from {AP_DEFINITIONS}")


# ----------------------------------------------------------------------------------------------- sampling
def sample_low_shot(labels: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of k random samples per class (fewer if a class has fewer), classes in increasing order.

    Args:
        labels: (N,) integer labels, or (N, C) multi-label targets where `> 0` marks the classes of a sample.
        k: samples per class.
        rng: numpy random generator.
    """
    labels = np.asarray(labels)
    members = (
        [np.nonzero(labels[:, c] > 0)[0] for c in range(labels.shape[1])]
        if labels.ndim == 2
        else [np.nonzero(labels == c)[0] for c in np.unique(labels)]
    )
    return np.concatenate([rng.permutation(m)[:k] for m in members]).astype(np.int64)


def check_shots(labels: np.ndarray, shots: Sequence[int], class_names: Sequence[str] | None = None) -> None:
    """A k-shot result needs k training samples of every class: with fewer, `sample_low_shot` takes what there is,
    and a figure filed as k-shot would have been measured on fewer shots.

    Raises:
        ValueError: The largest of `shots` exceeds the samples of some class (the class is named).
    """
    labels = np.asarray(labels)
    counts = (labels > 0).sum(axis=0) if labels.ndim == 2 else np.bincount(labels)
    present = np.nonzero(counts)[0] if labels.ndim == 1 else np.arange(len(counts))
    smallest = int(present[np.argmin(counts[present])])
    if max(shots) > counts[smallest]:
        name = class_names[smallest] if class_names is not None and smallest < len(class_names) else smallest
        raise ValueError(
            f"--shots {max(shots)}: class {name} has only {int(counts[smallest])} training sample(s); give shots of "
            f"at most {int(counts[smallest])}, or more training data"
        )


def sample_low_shot_runs(
    labels: np.ndarray, shots: Sequence[int] = DEFAULT_SHOTS, runs: int = 5, seed: int = 0
) -> dict[int, list[np.ndarray]]:
    """`{k: [indices of run 0, ..., run runs-1]}`, drawn in order from one generator seeded with `seed`."""
    rng = np.random.default_rng(seed)
    return {k: [sample_low_shot(labels, k, rng) for _ in range(runs)] for k in shots}


# ---------------------------------------------------------------------------------------------------- SVMs
def voc_svm_map(
    train_features: np.ndarray,
    train_targets: np.ndarray,
    test_features: np.ndarray,
    test_targets: np.ndarray,
    cost: float = 0.5,
    ap_definition: str = "sklearn",
    ignore_difficult: bool = False,
) -> tuple[float, np.ndarray]:
    """One binary LinearSVC per class, as the official VOC branch; returns (mAP %, per-class AP % (C,)).

    Args:
        train_features / test_features: (N, F) L2-normalised features.
        train_targets / test_targets: (N, C) targets in {1, 0 (difficult), -1}; difficult counts as negative
            (official) unless `ignore_difficult`, which drops difficult test samples of that class (devkit).
    """
    aps = []
    for c in range(train_targets.shape[1]):
        svm = LinearSVC(
            C=cost,
            class_weight={1: 2, -1: 1},
            intercept_scaling=1.0,
            penalty="l2",
            loss="squared_hinge",
            tol=1e-4,
            dual=True,
            max_iter=2000,
            random_state=0,
        )
        svm.fit(train_features, np.where(train_targets[:, c] > 0, 1, -1))
        scores = svm.decision_function(test_features)
        valid = test_targets[:, c] != 0 if ignore_difficult else np.ones(len(scores), dtype=bool)
        aps.append(100.0 * average_precision(test_targets[valid, c] > 0, scores[valid], ap_definition))
    aps = np.asarray(aps)
    return float(aps.mean()), aps


def places_svm_accuracy(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    cost: float = 0.5,
) -> float:
    """One multi-class LinearSVC (liblinear one-vs-rest) as the official Places205 branch; top-1 accuracy %."""
    svm = LinearSVC(C=cost, tol=1e-4, dual=True, max_iter=2000, random_state=0)
    svm.fit(train_features, train_labels)
    return topk_accuracy(svm.predict(test_features), test_labels, (1,))["top1"]


def lowshot_svm_from_features(
    task: str,
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    subsets: dict[int, list[np.ndarray]],
    options: LowShotOptions,
) -> dict[str, float]:
    """Scores every low-shot subset (`options`: `cost`, `ap_definition`, `ignore_difficult`). Features are
    L2-normalised here (raw pooled features in).

    Args:
        task: "voc07" (mAP) or "places205" (accuracy).
        train_features: (N, F) pooled features of the rows that `subsets` index.
        subsets: `{k: [row indices of each run]}` as from `sample_low_shot_runs`.

    Returns:
        `{"<metric>_k<k>_mean": %, "<metric>_k<k>_std": %}` with metric "map" (VOC07) or "accuracy" (Places205).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
    train_features, test_features = l2_normalize(train_features), l2_normalize(test_features)
    metric = "map" if task == "voc07" else "accuracy"
    results = {}
    for k, runs in subsets.items():
        scores = []
        for rows in runs:
            with warnings.catch_warnings():
                # max_iter=2000 as official; liblinear may stop before convergence on large k, as it did there.
                warnings.simplefilter("ignore", ConvergenceWarning)
                if task == "voc07":
                    score = voc_svm_map(
                        train_features[rows], train_labels[rows], test_features, test_labels, options.cost,
                        options.ap_definition, options.ignore_difficult,
                    )[0]  # fmt: skip
                else:
                    train_x, train_y = train_features[rows], train_labels[rows]
                    score = places_svm_accuracy(train_x, train_y, test_features, test_labels, options.cost)
            scores.append(score)
        results[f"{metric}_k{k}_mean"] = float(np.mean(scores))
        results[f"{metric}_k{k}_std"] = float(np.std(scores))
    return results


def evaluate_lowshot_svm(
    model,
    task: str,
    train_dataset: ImageLabelDataset,
    test_dataset: ImageLabelDataset,
    options: LowShotOptions,
) -> dict[str, float]:
    """The whole protocol: sample every subset first, extract pooled features of their union only (Places205
    train has 2.4M images; the subsets a few thousand), then fit and score the SVMs."""
    check_shots(train_dataset.labels, options.shots, getattr(train_dataset, "classes", None))
    model = load_model(model, options.device)
    subsets = sample_low_shot_runs(train_dataset.labels, options.shots, options.runs, options.seed)
    union = np.unique(np.concatenate([rows for per_k in subsets.values() for rows in per_k]))
    row_in_union = {int(i): j for j, i in enumerate(union)}
    remapped = {
        k: [np.asarray([row_in_union[int(i)] for i in rows]) for rows in per_k] for k, per_k in subsets.items()
    }
    extract = dict(kinds=("pooled",), **options.extraction())
    train = extract_features(model, train_dataset.subset(union), desc="svm train features", **extract)
    if train.skipped_ids:  # the low-shot subsets index rows of `union`: a missing row would shift them all
        raise ValueError(
            f"{len(train.skipped_ids)} low-shot training images cannot be decoded (e.g. {train.skipped_ids[:3]}); "
            "fix or remove them from the dataset's list"
        )
    test = extract_features(model, test_dataset, desc="svm test features", **extract)
    return lowshot_svm_from_features(task, train.pooled, train.labels, test.pooled, test.labels, remapped, options)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--task", choices=TASKS, required=True)
    parser.add_argument("--data_dir", required=True, help="VOC root (holding VOCdevkit/) or Places205 root")
    parser.add_argument("--shots", type=positive_int, nargs="+", default=list(DEFAULT_SHOTS))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--cost", type=float, default=0.5, help="SVM C (official 0.5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ap_definition", choices=AP_DEFINITIONS, default="sklearn")
    parser.add_argument("--ignore_difficult", action="store_true", help="VOC devkit rule instead of the official")
    args = parser.parse_args(argv)

    model = load_model(args.model_name_or_path, args.device)
    transform = transforms_from_config(model.config)
    if args.task == "voc07":
        train, test = (
            voc07_dataset(args.data_dir, "trainval", transform),
            voc07_dataset(args.data_dir, "test", transform),
        )
    else:
        train = places205_dataset(args.data_dir, "train", transform)
        test = places205_dataset(args.data_dir, "val", transform)
    metrics = evaluate_lowshot_svm(model, args.task, train, test, LowShotOptions.from_args(args))
    name, dataset_type = DATASET_CARDS[args.task]
    metadata = {"ap_definition": args.ap_definition, "difficult": "ignored" if args.ignore_difficult else "negative"}
    path = save_eval_results(
        results_dir(args), "lowshot_svm", metrics, name, dataset_type, args.task,
        metadata=metadata if args.task == "voc07" else None,
    )  # fmt: skip
    print(f"{metrics} -> {path}")
    return metrics


__all__ = [
    "LowShotOptions",
    "average_precision",
    "evaluate_lowshot_svm",
    "lowshot_svm_from_features",
    "places_svm_accuracy",
    "sample_low_shot",
    "sample_low_shot_runs",
    "voc07_11point_ap",
    "voc_interpolated_ap",
    "voc_svm_map",
]

if __name__ == "__main__":
    from modeling_mopro.cli import run_command

    run_command(main)
