"""Per-sample noise report of a trained MoPro model: which web labels it keeps, corrects or drops as OOD.

Every sample goes through the test view (centre crop), then through the *training* rule,
`modeling_mopro.correct_noisy_labels`, with the model config's `alpha`, `pseudo_label_threshold` and
`temperature` (soft label `alpha * softmax(logits) + (1 - alpha) * softmax(q . prototypes / T)`; relabel when its
max exceeds the threshold; keep when relabelled or when the given label scores above 1/K), and with
`config.ood_rule` ("prototype_distance" also drops samples whose embedding is far from every prototype,
`far_from_prototypes`). The official offline `noise_cleaning.py` hard-codes alpha = 0.5 instead.

Decisions: "ood" = not kept; "relabelled" = kept and corrected label != given label; "clean" = kept and unchanged.

Outputs (in `output_dir`):
- `noise_report.parquet`: one row per sample: `id` (the relative path when known: file layouts, or a `path`
  column; else `sample_id`; else the position), `sample_id` when the dataset has one, `given_label`, `corrected_label`,
  `decision`, `prob_given_label` (classifier softmax), `max_prototype_similarity` (cosine),
  `soft_score_given_label`, `max_soft_score`, plus `true_label` / `is_ood` when the dataset has them.
- `pseudo_label.json`: the official format `{"images": [...], "labels": [...]}` of the kept samples, with their
  corrected labels (input of `evaluation.classifier_retrain`).
- `noise_report_summary.json`: counts and fractions of each decision, `num_skipped_images` and `skipped_images` (the
  ids of the undecodable images, which are skipped and have no row); with ground-truth columns, relabel and OOD
  precision / recall (null when undefined).
- `noise_report.png`: per-class (given label) stacked bars of clean / relabelled / OOD counts.

Several processes (``accelerate launch``, or the end of `training/run_mopro.py`): each one scores its own
contiguous share of the dataset, the shares are gathered to the main process in dataset order and the main
process writes the files. No process waits on another for more than the imbalance of one sample.

    python -m evaluation.noise_report --model_name_or_path DIR --data_dir WEBVISION_DATASET --split train
    accelerate launch -m evaluation.noise_report --model_name_or_path DIR --data_dir WEBVISION_DATASET
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate import PartialState

from modeling_mopro import correct_noisy_labels, far_from_prototypes
from modeling_mopro.distributed import is_distributed, rank, world_size

from .features import extract_features, load_model, mopro_parts
from .image_datasets import (
    ImageLabelDataset,
    add_dataset_arguments,
    check_class_names,
    dataset_from_arguments,
    hf_image_dataset,
    load_hf_dataset,
    transforms_from_config,
)

DECISIONS = ("clean", "relabelled", "ood")
GROUND_TRUTH_COLUMNS = ("true_label", "is_ood")


@torch.no_grad()
def noise_decisions(
    logits: np.ndarray | torch.Tensor,
    embeddings: np.ndarray | torch.Tensor,
    prototypes: torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    config,
) -> dict[str, np.ndarray]:
    """The training-time correction rule applied offline, with the scores behind it.

    Args:
        logits: (N, K) classifier logits.
        embeddings: (N, D) L2-normalised embeddings.
        prototypes: (K, D) class prototypes.
        labels: (N,) given labels.
        config: a `MoProConfig` (alpha, pseudo_label_threshold, temperature, ood_rule, ood_similarity_threshold).

    Returns:
        numpy arrays: `corrected_label`, `kept`, `decision` (index into DECISIONS), `prob_given_label`,
        `max_prototype_similarity`, `soft_score_given_label`, `max_soft_score`.
    """
    logits = torch.as_tensor(logits).float()
    embeddings = torch.as_tensor(embeddings).float()
    prototypes = prototypes.detach().float().cpu()
    labels = torch.as_tensor(labels).long()
    similarities = embeddings @ prototypes.T  # (N, K), as `prototype_logits` before the temperature
    prototype_logits = similarities / config.temperature
    corrected, kept = correct_noisy_labels(
        logits, prototype_logits, labels, config.alpha, config.pseudo_label_threshold
    )
    if config.ood_rule == "prototype_distance":
        kept = kept & ~far_from_prototypes(embeddings, prototypes, config.ood_similarity_threshold)
    decision = torch.where(kept, (corrected != labels).long(), torch.full_like(labels, DECISIONS.index("ood")))
    # The soft label itself, for the report (correct_noisy_labels keeps it internal).
    soft = config.alpha * F.softmax(logits, 1) + (1 - config.alpha) * F.softmax(prototype_logits, 1)
    given = labels[:, None]
    return {
        "corrected_label": corrected.numpy(),
        "kept": kept.numpy(),
        "decision": decision.numpy(),
        "prob_given_label": F.softmax(logits, 1).gather(1, given).squeeze(1).numpy(),
        "max_prototype_similarity": similarities.max(1).values.numpy(),
        "soft_score_given_label": soft.gather(1, given).squeeze(1).numpy(),
        "max_soft_score": soft.max(1).values.numpy(),
    }


def process_share(num_samples: int) -> range:
    """The contiguous rows of a `num_samples`-row dataset that this process scores (all of them in one process).

    Contiguous, disjoint shares that cover the dataset: no sampler padding, so every sample is scored exactly
    once, and concatenating the shares in rank order gives the dataset order.
    """
    return range(rank() * num_samples // world_size(), (rank() + 1) * num_samples // world_size())


def _gather_columns(columns: dict[str, list | np.ndarray]) -> dict[str, list | np.ndarray] | None:
    """Every process's report columns, concatenated in rank order on the main process (None elsewhere)."""
    if not is_distributed():
        return columns
    shares = [None] * world_size() if rank() == 0 else None
    dist.gather_object(columns, shares, dst=0)
    if rank() != 0:
        return None
    return {
        name: np.concatenate([share[name] for share in shares])
        if isinstance(columns[name], np.ndarray)
        else [value for share in shares for value in share[name]]
        for name in columns
    }


def build_noise_report(
    model,
    dataset,
    batch_size: int = 256,
    num_workers: int = 8,
    device: str | None = None,
    amp: bool = False,
    image_column: str = "image",
    label_column: str = "label",
):
    """Runs the model over `dataset` and returns the per-sample report as a `datasets.Dataset`.

    In several processes (a `torch.distributed` group), each one scores `process_share` of the rows and the main
    process returns the whole report, in dataset order; the others return None.

    Args:
        model: A MoPro model with classifier (or its folder).
        dataset: An `ImageLabelDataset`, or a `datasets.Dataset` with image and label columns and optional
            `sample_id` / `path` (ids) and `true_label` / `is_ood` (ground truth, copied to the report).

    Undecodable images are skipped (logged with their ids) and have no row; `write_noise_report` counts them.
    """
    return _build_noise_report(model, dataset, batch_size, num_workers, device, amp, image_column, label_column)[0]


def _build_noise_report(
    model, dataset, batch_size, num_workers, device, amp, image_column, label_column
) -> tuple[object | None, list[str] | None]:
    """`build_noise_report`, plus the ids of the skipped (undecodable) images (main process; None elsewhere)."""
    import datasets

    model = load_model(model, device)
    base, _ = mopro_parts(model)
    extra: dict[str, list] = {}
    share = process_share(len(dataset))
    if isinstance(dataset, datasets.Dataset):
        hf = dataset
        rows = hf.select_columns([c for c in ("sample_id", *GROUND_TRUTH_COLUMNS) if c in hf.column_names])
        extra = rows[share.start : share.stop] if rows.column_names else {}
        extra = {name: np.asarray(values) for name, values in extra.items()}
        dataset = hf_image_dataset(hf, transforms_from_config(model.config), image_column, label_column)
    check_class_names(dataset, model.config, "the noise report's data")
    if len(share) < len(dataset):
        dataset = dataset.subset(np.arange(share.start, share.stop))  # keeps the dataset-wide ids
    features = extract_features(
        model, dataset, ("embeddings", "logits"), batch_size, num_workers, device, amp, desc="noise report"
    )
    if features.logits is None:
        raise ValueError("the noise report needs a model with a classifier")
    decisions = noise_decisions(features.logits, features.embeddings, base.prototypes, features.labels, model.config)
    if features.skipped_ids and extra:  # the ground-truth rows of the skipped images go too
        position = {sample_id: k for k, sample_id in enumerate(dataset.ids)}
        kept = np.ones(len(dataset), dtype=bool)
        kept[[position[sample_id] for sample_id in features.skipped_ids]] = False
        extra = {name: values[kept] for name, values in extra.items()}
    columns = {"id": features.ids}
    if "sample_id" in extra:
        columns["sample_id"] = extra.pop("sample_id")
    columns.update(
        given_label=features.labels.astype(np.int64),
        corrected_label=decisions["corrected_label"].astype(np.int64),
        decision=[DECISIONS[d] for d in decisions["decision"]],
        **{k: decisions[k].astype(np.float32) for k in ("prob_given_label", "max_prototype_similarity")},
        **{k: decisions[k].astype(np.float32) for k in ("soft_score_given_label", "max_soft_score")},
    )
    columns.update(extra)
    columns = _gather_columns(columns)
    skipped = _gather_columns({"skipped": list(features.skipped_ids)})
    if columns is None:
        return None, None
    return datasets.Dataset.from_dict(columns), skipped["skipped"]


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def summarize_noise_report(report, config=None) -> dict[str, float | int | str | None]:
    """Counts and fractions of each decision; relabel / OOD precision and recall when ground truth is present.

    - `ood_precision` / `ood_recall`: of the samples dropped, the share that is OOD / of the OOD samples, the share
      dropped (`is_ood`).
    - `relabel_precision`: of the relabelled samples, the share relabelled to their true class (an OOD sample
      relabelled counts as wrong); `relabel_recall`: of the in-distribution samples with a wrong given label, the
      share relabelled to the true class; `kept_label_accuracy`: of the kept in-distribution samples, the share whose
      corrected label is right; `given_label_accuracy`: the same for the given labels of all in-distribution samples.
    """
    decision = np.asarray(report["decision"])
    n = len(decision)
    summary: dict[str, float | int | str | None] = {"num_samples": n}
    for name in DECISIONS:
        count = int((decision == name).sum())
        summary[f"num_{name}"] = count
        summary[f"fraction_{name}"] = _ratio(count, n)
    if config is not None:
        summary.update(
            alpha=config.alpha,
            pseudo_label_threshold=config.pseudo_label_threshold,
            temperature=config.temperature,
            ood_rule=config.ood_rule,
        )
    dropped, relabelled = decision == "ood", decision == "relabelled"
    columns = report.column_names
    is_ood = np.asarray(report["is_ood"], dtype=bool) if "is_ood" in columns else np.zeros(n, dtype=bool)
    if "is_ood" in columns:
        summary["ood_precision"] = _ratio(int((dropped & is_ood).sum()), int(dropped.sum()))
        summary["ood_recall"] = _ratio(int((dropped & is_ood).sum()), int(is_ood.sum()))
    if "true_label" in columns:
        true = np.asarray(report["true_label"], dtype=np.int64)
        given, corrected = np.asarray(report["given_label"]), np.asarray(report["corrected_label"])
        in_distribution = ~is_ood & (true >= 0)
        fixed = relabelled & in_distribution & (corrected == true)
        noisy = in_distribution & (given != true)
        kept_in = in_distribution & ~dropped
        summary["relabel_precision"] = _ratio(int(fixed.sum()), int(relabelled.sum()))
        summary["relabel_recall"] = _ratio(int((fixed & noisy).sum()), int(noisy.sum()))
        summary["kept_label_accuracy"] = _ratio(int((kept_in & (corrected == true)).sum()), int(kept_in.sum()))
        summary["given_label_accuracy"] = _ratio(
            int((in_distribution & (given == true)).sum()), int(in_distribution.sum())
        )
    return summary


def pseudo_labels(report) -> dict[str, list]:
    """The official `pseudo_label.json` content: the ids (relative paths when known) of the kept samples with their
    corrected labels."""
    names = report["id"]
    decision, corrected = report["decision"], report["corrected_label"]
    kept = [i for i, d in enumerate(decision) if d != "ood"]
    return {"images": [names[i] for i in kept], "labels": [int(corrected[i]) for i in kept]}


def plot_noise_report(report, path: str | os.PathLike, num_classes: int | None = None, class_names=None) -> None:
    """Per-class (given label) stacked bar chart of clean / relabelled / OOD counts, saved as PNG (Agg canvas,
    no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    given, decision = np.asarray(report["given_label"]), np.asarray(report["decision"])
    num_classes = num_classes or (int(given.max()) + 1 if len(given) else 1)
    classes = np.arange(num_classes)
    figure = Figure(figsize=(min(4 + 0.25 * num_classes, 40), 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    bottom = np.zeros(num_classes)
    for name, color in zip(DECISIONS, ("tab:green", "tab:orange", "tab:red"), strict=True):
        counts = np.bincount(given[decision == name], minlength=num_classes)[:num_classes]
        axes.bar(classes, counts, bottom=bottom, color=color, label=name, width=0.8)
        bottom += counts
    axes.set_xlabel("given label")
    axes.set_ylabel("samples")
    axes.set_title("MoPro noise report: decision per given class")
    if class_names is not None and num_classes <= 50:
        axes.set_xticks(classes, [str(c) for c in class_names[:num_classes]], rotation=90, fontsize=7)
    axes.legend()
    figure.tight_layout()
    figure.savefig(str(path), format="png")


def write_noise_report(
    model,
    dataset,
    output_dir: str | os.PathLike,
    batch_size: int = 256,
    num_workers: int = 8,
    device: str | None = None,
    amp: bool = False,
    image_column: str = "image",
    label_column: str = "label",
) -> dict[str, float | int | str | None]:
    """Builds the report and writes the parquet file, `pseudo_label.json`, the summary JSON and the plot.

    In several processes, each scores its share (see `build_noise_report`) and the main process writes the files.

    Returns:
        The summary (in every process).
    """
    model = load_model(model, device)
    report, skipped = _build_noise_report(
        model, dataset, batch_size, num_workers, device, amp, image_column, label_column
    )
    summary = None
    if report is not None:  # the main process
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        report.to_parquet(str(output_dir / "noise_report.parquet"))
        (output_dir / "pseudo_label.json").write_text(json.dumps(pseudo_labels(report)))
        summary = summarize_noise_report(report, model.config)
        # Undecodable images have no row; the summary counts and names them (training skipped them too).
        summary.update(num_skipped_images=len(skipped), skipped_images=skipped)
        (output_dir / "noise_report_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        id2label = getattr(model.config, "id2label", None) or {}
        names = [id2label.get(i, str(i)) for i in range(model.config.num_labels)]
        plot_noise_report(report, output_dir / "noise_report.png", model.config.num_labels, names)
    if is_distributed():
        shared = [summary]
        dist.broadcast_object_list(shared, src=0)  # waits only for the main process's writing
        summary = shared[0]
    return summary


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="saved MoPro folder")
    parser.add_argument("--output_dir", default=None, help="default: the model folder")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--num_workers", type=int, default=8)
    parser.add_argument("--device", default=None)
    parser.add_argument("--amp", action="store_true")
    add_dataset_arguments(parser)
    args = parser.parse_args(argv)

    # Under `accelerate launch`, this joins the process group (one device per process); alone, it does nothing.
    state = PartialState()
    device = args.device or (state.device if state.num_processes > 1 else None)
    model = load_model(args.model_name_or_path, device)
    path = Path(args.data_dir)
    is_hf = args.data_format == "hf" or (
        args.data_format == "auto"
        and (not path.is_dir() or (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists())
    )
    dataset: ImageLabelDataset | object
    if is_hf:  # keep the raw dataset: its ground-truth columns go into the report
        dataset = load_hf_dataset(args.data_dir, args.split or "train")
        if args.image_column != "image" or args.label_column != "label":
            dataset = dataset.rename_columns({args.image_column: "image", args.label_column: "label"})
    else:
        dataset = dataset_from_arguments(args, transforms_from_config(model.config), default_split="train")
    summary = write_noise_report(
        model, dataset, args.output_dir or args.model_name_or_path, args.batch_size, args.num_workers,
        device, args.amp,
    )  # fmt: skip
    if state.is_main_process:
        print(json.dumps(summary, indent=2))
    return summary


__all__ = [
    "DECISIONS",
    "build_noise_report",
    "noise_decisions",
    "plot_noise_report",
    "process_share",
    "pseudo_labels",
    "summarize_noise_report",
    "write_noise_report",
]

if __name__ == "__main__":
    from training.cli import run_command

    run_command(main)
