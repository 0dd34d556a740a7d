"""The dataset card (README.md) of a noise report: what a reader of the published dataset needs to use it.

Front matter for the Hub (pretty name, task, tags, size), then: what the rows are, the counts, the scores against
the ground truth when the data had it, a per-class table, the plot, how the report was made and how to load it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from huggingface_hub import DatasetCardData

from .noise_scores import DECISIONS, EVIDENCE_COMBINED, EVIDENCE_TRAINING, MAX_RELABEL_SHARE

MAX_CLASS_ROWS = 50  # beyond this, the card lists the classes with the most non-clean samples

COLUMN_DOCS = (
    ("id", "the sample's relative path when known, else a file or id column, else its `sample_id` (row index)"),
    ("sample_id", "the source dataset's own id (when it has one)"),
    ("given_label", "the label the sample came with"),
    ("suggested_label", "the label the report suggests (the given one for clean samples)"),
    ("decision", "`clean`, `relabelled` or `ood` (out of distribution: no class fits)"),
    ("label_quality", "0-1, high when the given label is likely right"),
    ("ood_score", "0-1, high when the image likely belongs to no class"),
    ("ood_probability", "posterior of the high mode of the OOD-score mixture (0: fit not used, see the warning)"),
    (
        "confident_label",
        "the class the label evidence (training dynamics, or the neighbours' vote) confidently names (-1: none); "
        "relabelled when not the given one",
    ),
    ("training_rule_decision", "the decision of MoPro's training rule (fixed thresholds)"),
    ("training_rule_label", "the label of MoPro's training rule"),
    ("prob_given_label", "the classifier's softmax probability of the given label"),
    ("max_prototype_similarity", "cosine similarity of the embedding to the nearest class prototype"),
    ("true_label", "ground truth copied from the data (-1: out of distribution)"),
    ("is_ood", "ground truth copied from the data"),
)

TRUTH_ROWS = (
    ("label_error_precision", "label errors: precision of the flagged (non-clean) samples"),
    ("label_error_recall", "label errors: recall"),
    ("label_error_f1", "label errors: F1"),
    ("label_quality_auroc", "label errors: AUROC of `label_quality` (low first)"),
    ("label_quality_ap", "label errors: average precision of `label_quality`"),
    ("ood_auroc", "OOD: AUROC of `ood_score`"),
    ("ood_ap", "OOD: average precision of `ood_score`"),
    ("ood_precision", "OOD: precision of the `ood` decisions"),
    ("ood_recall", "OOD: recall of the `ood` decisions"),
    ("relabel_precision", "relabelled samples given their true class"),
    ("relabel_recall", "wrongly labelled in-distribution samples relabelled to their true class"),
    ("given_label_accuracy", "in-distribution samples whose given label is right"),
    ("kept_label_accuracy", "kept in-distribution samples whose suggested label is right"),
)


def _evidence_line(summary: Mapping) -> str:
    """How `label_quality` and the label decisions were made, in a sentence or two."""
    record = (
        "the training run's record: the classifier's softmax on each sample's training views, averaged over the "
        "epochs before noise correction began (`sample_dynamics.safetensors`)"
    )
    if summary.get("label_evidence") == EVIDENCE_TRAINING:
        return f"The label evidence is {record}; `label_quality` is its probability of the given label."
    if summary.get("label_evidence") == EVIDENCE_COMBINED:
        return (
            f"The label evidence is the mean of the neighbours' vote below and {record}; `label_quality` is its "
            "probability of the given label."
        )
    note = summary.get("label_evidence_note")
    return (
        "The label evidence is the neighbours' vote below; `label_quality` is its probability of the given label"
        + (f" (not the training run's record: {note})." if note else ".")
    )


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return name
    return "1M<n<10M" if n < 10_000_000 else "10M<n<100M"


def _percent(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _format_measure(key: str, value) -> str:
    """Rankings (AUROC, AP) as 0-1 numbers, rates as percentages, undefined as a dash."""
    if value is None:
        return "–"
    return f"{value:.3f}" if key.endswith(("_auroc", "_ap")) else _percent(value)


def _class_table(report, class_names: Sequence[str]) -> str:
    given, decision = np.asarray(report["given_label"]), np.asarray(report["decision"])
    num_classes = len(class_names)
    counts = {name: np.bincount(given[decision == name], minlength=num_classes) for name in DECISIONS}
    total = np.bincount(given, minlength=num_classes)
    classes = np.arange(num_classes)
    note = ""
    if num_classes > MAX_CLASS_ROWS:
        not_clean = (total - counts["clean"]) / np.maximum(total, 1)
        classes = np.argsort(-not_clean, kind="stable")[:MAX_CLASS_ROWS]
        note = f"The {MAX_CLASS_ROWS} of {num_classes} classes with the largest share of non-clean samples:\n\n"
    rows = [
        f"| {c} | {class_names[c]} | {total[c]} | {counts['clean'][c]} | {counts['relabelled'][c]} | "
        f"{counts['ood'][c]} |"
        for c in classes
    ]
    header = "| label | class | samples | clean | relabelled | ood |\n|---|---|---|---|---|---|"
    return note + header + "\n" + "\n".join(rows)


def noise_report_card(
    report,
    summary: Mapping,
    class_names: Sequence[str],
    model_name: str,
    data_description: str | None = None,
    plot_file: str = "noise_report.png",
    flagged_images: int | None = None,
    flagged_images_per_class: int | None = None,
    thumbnail_size: int | None = None,
) -> str:
    """The README.md of a noise report folder (or dataset repo).

    Args:
        report: The report (`datasets.Dataset` with the documented columns).
        summary: `summarize_noise_report`'s dict (plus `num_neighbours`, `num_skipped_images`).
        class_names: Class names in label order.
        model_name: Who scored the data, as a phrase ("the MoPro model `org/name`").
        data_description: Where the data came from, one line.
        flagged_images: Rows of the `flagged_images` configuration (None: the report has none, nor a gallery).
        flagged_images_per_class / thumbnail_size: its bound per class and decision, and the thumbnails' size.
    """
    data = data_description or "a dataset"
    configs = None
    if flagged_images is not None:
        # Both configurations, at the paths `Dataset.push_to_hub` writes them to (`data/` for the default one).
        configs = [
            {"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*"}], "default": True},
            {"config_name": "flagged_images", "data_files": [{"split": "train", "path": "flagged_images/train-*"}]},
        ]
    metadata = DatasetCardData(
        pretty_name=f"MoPro noise report of {data}",
        task_categories=["image-classification"],
        tags=["noisy-labels", "label-errors", "out-of-distribution", "mopro"],
        size_categories=[_size_category(len(report))],
        configs=configs,
    )
    n = summary["num_samples"]
    counts = "\n".join(
        f"| {name} | {summary[f'num_{name}']} | {_percent(summary[f'fraction_{name}'])} |" for name in DECISIONS
    )
    columns = "\n".join(f"| `{name}` | {text} |" for name, text in COLUMN_DOCS if name in report.column_names)
    truth = [(key, text, summary[key]) for key, text in TRUTH_ROWS if key in summary]
    truth_section = ""
    if truth:
        rows = "\n".join(f"| {text} | {_format_measure(key, value)} |" for key, text, value in truth)
        truth_section = f"""
## Against the ground truth

The data came with its true labels (`true_label`, `is_ood`), so the report can be scored. A label error is a sample
whose given label is not its true class, counting every out-of-distribution sample (no class is right for it).

| measure | value |
|---|---|
{rows}
"""
    rule = summary.get("decision_rule", "fitted")
    how = (
        "thresholds from this data. OOD: a two-component Gaussian mixture on `ood_score`, kept when BIC prefers it "
        "to one component, its modes are apart (Ashman's D > 2) and its fitted density dips between them, and the "
        "share it calls OOD is a minority, mostly of samples whose neighbours outvote their given label, flags a "
        "sample when its posterior exceeds 1/2; otherwise a conservative fallback decides and a warning above says "
        "why. Labels: confident learning on the label evidence (each class's threshold is its mean evidence among "
        "the samples given it; a sample confidently belongs to the class of highest evidence among those at or above their "
        f"threshold, `confident_label`); it relabels at most {MAX_RELABEL_SHARE:.0%} of the samples, beyond that nothing, and the "
        "warning says so too"
        if rule == "fitted"
        else "the training rule's fixed thresholds (the model config's `pseudo_label_threshold` and 1/K)"
    )
    warning_section = ""
    if summary.get("warning"):
        warning_section = f"""
> **Warning:** {summary["warning"][0].upper()}{summary["warning"][1:]}
"""
    ids = summary.get("ids")
    ids_line = f"\nThe `id` column holds {ids}." if ids else ""
    images_section = ""
    if flagged_images is not None:
        images_section = f"""
## The flagged images

**[Gallery](index.html)** (`index.html`, opens offline with its `gallery/` thumbnails): per given class, the relabelled
images (given → suggested, lowest label quality first) and the out-of-distribution ones (highest OOD score first),
with counts and this summary. The same {flagged_images} images are the `flagged_images` configuration, which the
Hub's dataset viewer shows with their labels and scores: at most {flagged_images_per_class} relabelled and
{flagged_images_per_class} OOD samples per given class, as JPEG thumbnails of at most {thumbnail_size} px a side,
beside the report's columns. The full table (`default` configuration) has no images.

```python
from datasets import load_dataset, load_from_disk

flagged = load_from_disk("noise_report/flagged_images")  # this folder; on the Hub:
flagged = load_dataset("<this repo>", "flagged_images", split="train")
```
"""
    skipped = summary.get("num_skipped_images", 0)
    skipped_line = f"\n{skipped} undecodable image(s) were skipped and have no row." if skipped else ""
    return f"""---
{metadata.to_yaml()}
---

# MoPro noise report of {data}

{n} rows, one per sample of {data}: whether its label looks right, which label the report suggests, and whether
the image belongs to any class at all. Scored by {model_name}.{skipped_line}{ids_line}
{warning_section}
| decision | samples | share |
|---|---|---|
{counts}

![decisions per given class]({plot_file})
{images_section}{truth_section}
## Columns

| column | meaning |
|---|---|
{columns}

## Per class

{_class_table(report, class_names)}

## How it was made

- Each image went through the model's test view. {_evidence_line(summary)} `ood_score` is the normalised
  entropy of the label vote of its {summary.get("num_neighbours")} nearest neighbours in MoPro's embedding space
  (their given labels, each weighted by exp(cosine / {summary.get("temperature")})): neighbours that agree on no
  class.
- Decisions: {how}. An OOD sample is `ood`; otherwise a sample whose confident class is not its given label is
  `relabelled` to that class (`suggested_label`).
- `training_rule_decision` keeps what MoPro's training rule decides, for comparison.

## Use

```python
from datasets import load_from_disk  # or load_dataset("<this repo>", split="train")

report = load_from_disk("noise_report")
clean = report.filter(lambda row: row["decision"] == "clean")
fixed = report.filter(lambda row: row["decision"] != "ood")  # train on `suggested_label`
```

`pseudo_label.json` lists the kept samples with their suggested labels in the format of the official MoPro code.
"""


__all__ = ["COLUMN_DOCS", "noise_report_card"]
