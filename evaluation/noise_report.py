"""Per-sample noise report of a trained MoPro model: which labels are wrong, which images do not belong at all.

Every sample goes through the test view (centre crop) and gets two scores (`evaluation.noise_scores`): a
label-quality score (how likely the given label is right: the vote of the given labels of its nearest neighbours in
MoPro's embedding space, averaged with the training run's record of the classifier's probabilities,
`sample_dynamics.safetensors`, when it sits beside the model and matches the data; `--label_evidence`) and an
out-of-distribution score (how much those neighbours disagree about the class). Decisions (clean / relabelled / ood)
come from thresholds
fitted to the data's own scores (`--decision_rule fitted`, the default), or from the training rule's constants
(`--decision_rule training`: `modeling_mopro.correct_noisy_labels` with the config's `alpha`,
`pseudo_label_threshold` and `temperature`, and `config.ood_rule`), whose decisions are in every report too.

Output (`--output_dir`, default `MODEL/noise_report`): a `datasets` dataset, `datasets.load_from_disk(output_dir)`,
one row per sample:

| column | meaning |
|---|---|
| `id` | the relative path when known (file layouts, a `path` column), else a file or id column, else `sample_id` |
| `sample_id` | the dataset's own id, when it has one |
| `given_label`, `suggested_label` | class labels; suggested = given for clean samples |
| `decision` | "clean", "relabelled" or "ood" (by `--decision_rule`) |
| `label_quality` | in [0, 1], high = the given label is likely right |
| `ood_score` | in [0, 1], high = likely out of distribution |
| `ood_probability` | posterior of the OOD score's fitted two-mode mixture (flagged above 0.5) |
| `confident_label` | the class the label evidence confidently names (confident learning's per-class thresholds; -1: none); relabelled when it is not the given label |
| `training_rule_decision`, `training_rule_label` | what the training rule decides |
| `prob_given_label`, `max_prototype_similarity` | classifier softmax of the given label; best prototype cosine |
| `true_label`, `is_ood` | copied from the data when it has ground truth |

Beside it: `README.md` (the dataset card: counts, per-class table, plot, how it was made), `noise_report.png`
(decisions per given class), `noise_report_summary.json` (counts; with ground truth, precision / recall / F1 of the
label errors, AUROC of both scores; `num_skipped_images` and the ids of undecodable images, which have no row; `ids`,
what the ids are; `label_evidence`, what the label decisions read, and `label_evidence_note`, why not the training
record when it was not used; `ood_fallback` / `relabel_refused` and a `warning` when a fitted threshold was not
trusted) and
`pseudo_label.json` (the official format: kept samples with their suggested labels, the input of
`evaluation.classifier_retrain`). The flagged samples' images (`evaluation.gallery`; `--flagged_images_per_class N`,
default 12: the N relabelled samples with the lowest label quality and the N OOD samples with the highest OOD score
of each given class; 96-px JPEG thumbnails, `--thumbnail_size`): `flagged_images/`, the report's rows for them with an
`image` column (`datasets.load_from_disk`; on the Hub the `flagged_images` configuration, which the dataset viewer
shows with labels and scores), and `index.html`, a gallery page with `gallery/*.jpg` that opens offline. The full
table stays image-free. `--push_to_hub ORG/NAME` publishes it all as a dataset repo (checked before any work:
offline, it fails at once); a release of the model then links it from the model card. The local card names the
model by its absolute path; the pushed card by `--model_repo_id` or the model folder's name.

Data: every source the trainer reads: a `datasets` folder or Hub name, an image folder, a WebVision root (its
training lists), a `training.data.make_shards` folder. Several processes (``accelerate launch``, or the end of
`training/run_mopro.py`): each one scores its own contiguous share of the dataset, the shares are gathered to the
main process in dataset order, and the main process computes the neighbour scores and writes the files.

    python -m evaluation.noise_report --model_name_or_path DIR --data_dir WEBVISION_ROOT
    python -m evaluation.noise_report --model_name_or_path DIR --data_dir DATA --push_to_hub org/data-noise-report
    accelerate launch -m evaluation.noise_report --model_name_or_path DIR --data_dir SHARD_DIR
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object
from safetensors import SafetensorError

from modeling_mopro import correct_noisy_labels, far_from_prototypes, neighbour_label_vote
from modeling_mopro.cli import check_output_dir, positive_int
from modeling_mopro.sample_dynamics import SAMPLE_DYNAMICS_FILE, SampleDynamics
from training.data.image_datasets import (
    DATA_FORMATS,
    add_dataset_arguments,
    check_class_names,
    dataset_from_arguments,
    hf_image_dataset,
)
from training.data.image_folder import passed_over_counts
from training.data.transforms import transforms_from_config

from .features import FeatureOptions, extract_features, load_model, mopro_parts
from .gallery import (
    DEFAULT_PER_CLASS,
    DEFAULT_THUMBNAIL_SIZE,
    FLAGGED_CONFIG,
    GALLERY_FILE,
    THUMBNAIL_DIR,
    flagged_images_dataset,
    flagged_rows,
    folder_size,
    write_gallery,
)
from .noise_report_card import noise_report_card
from .noise_scores import DECISIONS, FALLBACK_OOD_RULE, ScoredSamples, nearest_neighbours, noise_scores

DECISION_RULES = ("fitted", "training")
# What the label decisions read: the mean of the neighbour vote and the training run's per-sample record when it
# matches the data ("combined"; else the vote alone, said in the summary), the record alone or an error ("training"),
# the vote alone ("neighbours").
LABEL_EVIDENCE = ("combined", "training", "neighbours")
# The dataset-wide columns (from every sample's neighbours: computed after the gather), with their dtypes.
SCORE_COLUMNS = {"label_quality": np.float32, "ood_score": np.float32, "ood_probability": np.float32,
                 "confident_label": np.int64}  # fmt: skip
GROUND_TRUTH_COLUMNS = ("true_label", "is_ood")
SUMMARY_FILE = "noise_report_summary.json"
PLOT_FILE = "noise_report.png"


@dataclass(frozen=True)
class NoiseReportOptions(FeatureOptions):
    """How the report is made: the data's image and label columns, the decision rule ("fitted" or "training"), the
    label evidence (`LABEL_EVIDENCE`) and the training record to read it from, the neighbour vote's k and its
    reference subset, the flagged images per class and their thumbnails' size (0 images:
    no gallery), and how the model runs."""

    image_column: str = "image"
    label_column: str = "label"
    decision_rule: str = "fitted"
    label_evidence: str = "combined"
    sample_dynamics: str | None = None  # the training run's record (default: the model folder's)
    num_neighbours: int = 50
    max_reference: int | None = 200_000
    flagged_images_per_class: int = DEFAULT_PER_CLASS
    thumbnail_size: int = DEFAULT_THUMBNAIL_SIZE


@torch.no_grad()
def noise_decisions(
    logits: np.ndarray | torch.Tensor,
    embeddings: np.ndarray | torch.Tensor,
    prototypes: torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    config,
    neighbour_vote: torch.Tensor | None = None,
) -> dict[str, np.ndarray]:
    """The training-time correction rule applied offline, with the scores behind it.

    Args:
        logits: (N, K) classifier logits.
        embeddings: (N, D) L2-normalised embeddings.
        prototypes: (K, D) class prototypes.
        labels: (N,) given labels.
        config: a `MoProConfig` (alpha, pseudo_label_threshold, temperature, ood_rule, ood_similarity_threshold).
        neighbour_vote: (N, K) the neighbours' vote of the `queue_vote` rule, mixed in with `config.queue_vote_weight`.

    Returns:
        numpy arrays: `corrected_label`, `kept`, `decision` (index into DECISIONS), `prob_given_label`,
        `max_prototype_similarity`.
    """
    logits = torch.as_tensor(logits).float()
    embeddings = torch.as_tensor(embeddings).float()
    prototypes = prototypes.detach().float().cpu()
    labels = torch.as_tensor(labels).long()
    similarities = embeddings @ prototypes.T  # (N, K), as `prototype_logits` before the temperature
    prototype_logits = similarities / config.temperature
    weight = getattr(config, "queue_vote_weight", 0.0) if neighbour_vote is not None else 0.0
    vote = None if neighbour_vote is None else neighbour_vote.float().cpu()
    corrected, kept = correct_noisy_labels(
        logits, prototype_logits, labels, config.alpha, config.pseudo_label_threshold, None, vote, weight
    )
    if config.ood_rule == "prototype_distance":
        kept = kept & ~far_from_prototypes(embeddings, prototypes, config.ood_similarity_threshold)
    decision = torch.where(kept, (corrected != labels).long(), torch.full_like(labels, DECISIONS.index("ood")))
    return {
        "corrected_label": corrected.numpy(),
        "kept": kept.numpy(),
        "decision": decision.numpy(),
        "prob_given_label": F.softmax(logits, 1).gather(1, labels[:, None]).squeeze(1).numpy(),
        "max_prototype_similarity": similarities.max(1).values.numpy(),
    }


# A dataset's own names of its samples, in the order the report prefers them as its `id`: `path` (written by the file
# layouts, WebVision lists and `make_shards`), then the file and id columns that image datasets on the Hub commonly
# carry. `sample_id` (the row index `training.data.sources` adds) comes last.
ID_COLUMNS = ("path", "file_name", "filename", "file", "image_id", "id")


def _image_path(value) -> str | None:
    """The file path of an undecoded image value (a path string or a `datasets.Image` dict), None without one."""
    if isinstance(value, str):
        return value
    return value.get("path") if isinstance(value, Mapping) else None


def with_report_ids(
    dataset, image_column: str = "image", id_root: str | os.PathLike | None = None, id_column: str | None = None
) -> tuple[object, str | None, str]:
    """The dataset as the report reads it, the column its `id`s come from, and what those ids are (for the summary).

    For a `datasets.Dataset`, in order: `id_column` when given; a `path` column; with `id_root`, every image's path
    relative to it, added as a `path` column (image folders and WebVision lists read by `training.data.sources`, whose image
    column holds the files' paths: `pseudo_label.json` then reads back from that root); one of `ID_COLUMNS`;
    `sample_id` (row indices, which the summary says); else positions. An `ImageLabelDataset` keeps its own ids
    (relative paths for the file layouts of `training.data.image_datasets`; `id_root` names their folder).

    Raises:
        ValueError: `id_column` is not a column of the dataset.
    """
    if not isinstance(dataset, datasets.Dataset):
        ids = getattr(dataset, "ids", None)
        if ids is None or list(ids) == [str(i) for i in range(len(dataset))]:
            return dataset, None, "positions in the data (it names no file)"
        if id_root is not None:  # a file layout read from that folder
            return dataset, None, f"paths relative to {os.path.abspath(id_root)}"
        return dataset, None, "the data's own ids (paths relative to its folder for file layouts)"
    columns = dataset.column_names
    if id_column is not None:
        if id_column not in columns:
            raise ValueError(f"id column {id_column!r} is not in the data (columns: {', '.join(columns)})")
        return dataset, id_column, f"the data's `{id_column}` column"
    if "path" in columns and id_root is not None:  # a file layout read from that folder (`load_source`)
        return dataset, "path", f"paths relative to {os.path.abspath(id_root)}"
    if id_root is not None and image_column in columns:
        root = os.path.abspath(id_root)
        paths = [_image_path(value) for value in dataset.select_columns([image_column])[image_column]]
        relative = [None if p is None else os.path.relpath(os.path.join(root, p), root) for p in paths]
        if all(r is not None and r != os.pardir and not r.startswith(os.pardir + os.sep) for r in relative):
            return dataset.add_column("path", relative), "path", f"paths relative to {root}"
    found = next((name for name in ID_COLUMNS if name in columns), None)
    if found is not None:
        return dataset, found, f"the data's `{found}` column"
    if "sample_id" in columns:
        return dataset, "sample_id", "row indices (`sample_id`): the data has no path, file or id column"
    return dataset, None, "positions in the data: it has no path, file or id column"


class _BuiltReport(NamedTuple):
    """What `_build_noise_report` returns: the report, the ids of the skipped images, and `noise_scores`' result (its
    fits, for the summary). All None off the main process."""

    report: datasets.Dataset | None
    skipped: list[str] | None
    scores: ScoredSamples | None


def label_evidence(
    model, options: NoiseReportOptions, keys: np.ndarray, given: np.ndarray
) -> tuple[np.ndarray | None, str]:
    """The training run's class evidence for the report's rows: its mean probabilities (`modeling_mopro.sample_dynamics`)
    when `options.label_evidence` reads the record and the record matches these rows (NaN rows for rows it does not
    hold, with a note counting them), else None (the neighbour vote decides alone), with why not.

    The record is `options.sample_dynamics`, else the model folder's `sample_dynamics.safetensors`. It matches when
    every row's key (its `sample_id`, else its place in the data) was trained on, with the row's given label: any
    other dataset, order or labelling is refused rather than mapped onto the wrong samples. Rows it does not hold (a
    batch remainder dropped in every recorded epoch) get the vote alone.

    Raises:
        ValueError: `label_evidence` is "training" and there is no matching record (or is not one of LABEL_EVIDENCE).
    """
    if options.label_evidence not in LABEL_EVIDENCE:
        raise ValueError(f"label_evidence must be one of {LABEL_EVIDENCE}, got {options.label_evidence!r}")
    if options.label_evidence == "neighbours":
        return None, "the neighbour vote was asked for (label_evidence 'neighbours')"
    folder = getattr(model, "name_or_path", "") or ""
    path = options.sample_dynamics or (os.path.join(folder, SAMPLE_DYNAMICS_FILE) if os.path.isdir(folder) else None)
    if options.sample_dynamics and not os.path.isfile(path):  # named by the user: never passed over in silence
        raise FileNotFoundError(
            f"sample_dynamics {path}: no such file (the record a training run saves beside its model)"
        )
    if path is None or not os.path.isfile(path):
        reason = (
            f"no per-sample training record ({path or SAMPLE_DYNAMICS_FILE + ' beside the model'}): the model was "
            "trained before runs kept one, or with --record_sample_dynamics off"
        )
    else:
        try:
            record = SampleDynamics.load(path)
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise ValueError(f"{path}: not a readable per-sample training record ({error})") from error
        keys, given = np.asarray(keys, dtype=np.int64), np.asarray(given, dtype=np.int64)
        evidence, reason = None, ""
        if len(keys) and (keys.min() < 0 or keys.max() >= record.num_samples):
            reason = f"{path} records {record.num_samples} samples, and these rows' ids reach {keys.max()}: other data"
        elif record.num_classes != int(model.config.num_labels):
            reason = f"{path} records {record.num_classes} classes, the model has {model.config.num_labels}"
        else:
            evidence, visits = record.mean_probabilities(keys)
            seen = visits > 0
            relabelled = int((record.labels.numpy()[keys] != given)[seen].sum())
            if not seen.any():
                reason = f"none of the {len(keys)} rows is in the run {path} records"
            elif relabelled:
                reason = (
                    f"the given labels of {relabelled} of the {len(keys)} rows differ from those the run {path} "
                    "records trained with: other data, another order or another labelling"
                )
            elif not seen.all():  # a batch's remainder dropped in every recorded epoch, or rows trained on elsewhere
                return evidence, (
                    f"{int((~seen).sum())} of the {len(keys)} rows are not in the record (not trained on before "
                    "noise correction began): their label evidence is the neighbour vote alone"
                )
        if not reason:
            return evidence, ""
    if options.label_evidence == "training":
        raise ValueError(f"label_evidence 'training': {reason}")
    return None, reason


def build_noise_report(
    model,
    dataset,
    options: NoiseReportOptions,
    id_root: str | os.PathLike | None = None,
    id_column: str | None = None,
    with_scores: bool = False,
):
    """Runs the model over `dataset` and returns the per-sample report as a `datasets.Dataset` (with `with_scores`,
    also the `ScoredSamples` behind its fitted decisions, whose `fit_summary` the written summary holds).

    In several processes (accelerate's `PartialState`), each one scores its `split_between_processes` share of the
    rows, `gather_object` joins them and the main process returns the whole report, in dataset order; the others None.

    Args:
        model: A MoPro model with classifier (or its folder).
        dataset: An `ImageLabelDataset`, or a `datasets.Dataset` with image and label columns and optional
            `sample_id` / `path` (ids) and `true_label` / `is_ood` (ground truth, copied to the report).
        id_root / id_column: where the report's `id`s come from (`with_report_ids`).

    Undecodable images are skipped (logged with their ids) and have no row; `write_noise_report` counts them.
    """
    dataset, id_column, _ = with_report_ids(dataset, options.image_column, id_root, id_column)
    built = _build_noise_report(model, dataset, options, id_column)
    return (built.report, built.scores) if with_scores else built.report


def _build_noise_report(model, dataset, options: NoiseReportOptions, id_column: str | None = None) -> _BuiltReport:
    """`build_noise_report`, plus the ids of the skipped (undecodable) images and the fits behind the decisions
    (main process; None elsewhere). `id_column` names the ids of a `datasets.Dataset` (`with_report_ids`)."""
    if options.decision_rule not in DECISION_RULES:
        raise ValueError(f"decision_rule must be one of {DECISION_RULES}, got {options.decision_rule!r}")
    model = load_model(model, options.device)
    base, _ = mopro_parts(model)
    extra: dict[str, list] = {}
    state = PartialState()
    # This process's rows (all of them alone): contiguous, disjoint, unpadded shares that concatenate, in process
    # order, to the dataset order, so every sample is scored exactly once.
    with state.split_between_processes(torch.arange(len(dataset))) as share:
        share = share.numpy()
        positions = share  # the rows' places in the data (a training record's keys when it has no sample_id)
        if isinstance(dataset, datasets.Dataset):
            hf = dataset
            rows = hf.select_columns([c for c in ("sample_id", *GROUND_TRUTH_COLUMNS) if c in hf.column_names])
            extra = rows.select(share).to_dict() if rows.column_names else {}
            extra = {name: np.asarray(values) for name, values in extra.items()}
            view = transforms_from_config(model.config)
            dataset = hf_image_dataset(hf, view, options.image_column, options.label_column, id_column)
        check_class_names(dataset, model.config, "the noise report's data")
        if len(share) < len(dataset):
            dataset = dataset.subset(share)  # keeps the dataset-wide ids
        features = extract_features(
            model, dataset, ("embeddings", "logits"), desc="noise report", **options.extraction()
        )
    if features.logits is None:
        raise ValueError("the noise report needs a model with a classifier")
    if features.skipped_ids:  # the ground-truth rows and places of the skipped images go too
        position = {sample_id: k for k, sample_id in enumerate(dataset.ids)}
        kept = np.ones(len(dataset), dtype=bool)
        kept[[position[sample_id] for sample_id in features.skipped_ids]] = False
        extra = {name: values[kept] for name, values in extra.items()}
        positions = positions[kept]
    columns = {"id": features.ids, "position": positions}
    if "sample_id" in extra:
        columns["sample_id"] = extra.pop("sample_id")
    columns["given_label"] = features.labels.astype(np.int64)
    # The training rule is per sample, so each process applies it to its share; only `queue_vote`'s neighbour vote
    # needs every sample's embedding: then the (N, K) logits are gathered too and the rule runs after the gather.
    queue_vote = getattr(model.config, "noise_correction_rule", "official") == "queue_vote"
    if queue_vote:
        columns["logits"] = features.logits
    else:
        rule = noise_decisions(features.logits, features.embeddings, base.prototypes, features.labels, model.config)
        columns.update(_rule_columns(rule))
    columns["embeddings"] = features.embeddings  # gathered for the dataset-wide scores below, then dropped
    columns.update(extra)
    shares = gather_object([(columns, list(features.skipped_ids))])  # every process's, in process order
    if state.use_distributed and not state.is_main_process:
        return _BuiltReport(None, None, None)
    columns = {
        name: np.concatenate([share[name] for share, _ in shares])
        if isinstance(values, np.ndarray)
        else [value for share, _ in shares for value in share[name]]
        for name, values in columns.items()
    }
    # The neighbour vote needs every sample's embedding: scored on the main process, on the model's device.
    embeddings = torch.as_tensor(columns.pop("embeddings"), device=next(model.parameters()).device)
    config = model.config
    # A training run's record is keyed by the data's sample_id (positions when it had none: `training.data.sources`).
    positions = columns.pop("position")
    keys = columns["sample_id"] if "sample_id" in columns else positions
    evidence, evidence_note = label_evidence(model, options, keys, columns["given_label"])
    fitted = noise_scores(
        embeddings, columns["given_label"], config.num_labels, config.temperature, options.num_neighbours,
        options.max_reference, training_evidence=evidence, combine=options.label_evidence == "combined",
    )  # fmt: skip
    fitted.label_evidence_note = evidence_note
    if queue_vote:  # the training queue's keys vote in training; offline, the dataset's own embeddings stand in
        if config.queue_vote_k == options.num_neighbours:  # the fitted scores' evidence is that very vote
            vote = torch.as_tensor(fitted["class_evidence"])
        else:
            similarities, neighbours = nearest_neighbours(embeddings, config.queue_vote_k, options.max_reference)
            given = torch.as_tensor(columns["given_label"], device=embeddings.device)
            vote = neighbour_label_vote(similarities, given[neighbours], config.num_labels, config.temperature)
        rule = noise_decisions(
            columns.pop("logits"), embeddings.cpu(), base.prototypes, columns["given_label"], config, vote
        )
        columns = {**_rule_columns(rule), **columns}  # before the ground truth, as in the per-process case
    if options.decision_rule == "fitted":
        suggested, decision = fitted["suggested_label"], [DECISIONS[d] for d in fitted["decision"]]
    else:
        suggested, decision = columns["training_rule_label"], columns["training_rule_decision"]
    ordered = {"id": columns.pop("id")}
    if "sample_id" in columns:
        ordered["sample_id"] = columns.pop("sample_id")
    ordered.update(
        given_label=columns.pop("given_label"),
        suggested_label=np.asarray(suggested, dtype=np.int64),
        decision=decision,
        **{name: fitted[name].astype(dtype) for name, dtype in SCORE_COLUMNS.items()},
        **columns,
    )
    return _BuiltReport(datasets.Dataset.from_dict(ordered), [i for _, ids in shares for i in ids], fitted)


def _rule_columns(rule: dict[str, np.ndarray]) -> dict[str, list | np.ndarray]:
    """The report's columns of the training rule's decisions (`noise_decisions`)."""
    return {
        "training_rule_decision": [DECISIONS[d] for d in rule["decision"]],
        "training_rule_label": rule["corrected_label"].astype(np.int64),
        **{k: rule[k].astype(np.float32) for k in ("prob_given_label", "max_prototype_similarity")},
    }


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def _ranking_quality(positive: np.ndarray, score: np.ndarray) -> tuple[float | None, float | None]:
    """(AUROC, average precision) of `score` ranking the `positive` samples first; None when one class is absent."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    if positive.all() or not positive.any():
        return None, None
    return float(roc_auc_score(positive, score)), float(average_precision_score(positive, score))


def summarize_noise_report(
    report, config=None, decision_rule: str | None = None
) -> dict[str, float | int | str | None]:
    """Counts and fractions of each decision; with ground truth (`true_label`, `is_ood`), how right they are.

    - `label_error_precision` / `_recall` / `_f1`: a label error is a sample whose given label is not its true class
      (every OOD sample: no class is right); the flagged samples are those not called clean.
    - `label_quality_auroc` / `_ap`: how well a low `label_quality` ranks the label errors first.
    - `ood_auroc` / `ood_ap`: how well a high `ood_score` ranks the OOD samples first; `ood_precision` /
      `ood_recall`: of the samples called OOD, the share that is / of the OOD samples, the share called OOD.
    - `relabel_precision`: of the relabelled samples, the share relabelled to their true class (an OOD sample
      relabelled counts as wrong); `relabel_recall`: of the in-distribution samples with a wrong given label, the
      share relabelled to the true class; `kept_label_accuracy`: of the kept in-distribution samples, the share whose
      suggested label is right; `given_label_accuracy`: the same for the given labels of all in-distribution samples.
    """
    decision = np.asarray(report["decision"])
    n = len(decision)
    summary: dict[str, float | int | str | None] = {"num_samples": n}
    for name in DECISIONS:
        count = int((decision == name).sum())
        summary[f"num_{name}"] = count
        summary[f"fraction_{name}"] = _ratio(count, n)
    if decision_rule is not None:
        summary["decision_rule"] = decision_rule
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
        summary["ood_auroc"], summary["ood_ap"] = _ranking_quality(is_ood, np.asarray(report["ood_score"]))
    if "true_label" in columns:
        true = np.asarray(report["true_label"], dtype=np.int64)
        given, suggested = np.asarray(report["given_label"]), np.asarray(report["suggested_label"])
        error, flagged = given != true, decision != "clean"
        precision = _ratio(int((flagged & error).sum()), int(flagged.sum()))
        recall = _ratio(int((flagged & error).sum()), int(error.sum()))
        summary["label_error_precision"], summary["label_error_recall"] = precision, recall
        summary["label_error_f1"] = 2 * precision * recall / (precision + recall) if precision and recall else None
        summary["label_quality_auroc"], summary["label_quality_ap"] = _ranking_quality(
            error, -np.asarray(report["label_quality"])
        )
        in_distribution = ~is_ood & (true >= 0)
        fixed = relabelled & in_distribution & (suggested == true)
        noisy = in_distribution & (given != true)
        kept_in = in_distribution & ~dropped
        summary["relabel_precision"] = _ratio(int(fixed.sum()), int(relabelled.sum()))
        summary["relabel_recall"] = _ratio(int((fixed & noisy).sum()), int(noisy.sum()))
        summary["kept_label_accuracy"] = _ratio(int((kept_in & (suggested == true)).sum()), int(kept_in.sum()))
        summary["given_label_accuracy"] = _ratio(
            int((in_distribution & (given == true)).sum()), int(in_distribution.sum())
        )
    return summary


def fit_summary(scores: ScoredSamples, decision_rule: str = "fitted") -> dict[str, float | int | str | None]:
    """What the summary says of what stands behind the fitted decisions (`evaluation.noise_scores`).

    - `ood_fallback`: True when the OOD fit was not trusted and the OOD decisions follow `ood_fallback_rule`;
      `ood_fallback_reason` says why. `relabel_refused`: True when confident learning would have relabelled more
      than `MAX_RELABEL_SHARE` of the samples and nothing was relabelled (`relabel_refused_reason`). `warning` says
      so in sentences (only under the fitted decision rule).
    - `ood_fit_separation` (Ashman's D), `ood_fit_dip` (the fitted density's dip between the modes, 1: none),
      `ood_fit_weight` (the OOD mode's weight), `ood_fit_share` (the share the fit alone would call OOD);
      `label_evidence` (what the label decisions read: "neighbour vote + training dynamics", "training dynamics" or
      "neighbour vote"; `label_evidence_note` says why not the training record), `label_issue_share` (the share
      confident learning names another class for, relabelled or refused) and
      `label_threshold_min` / `_median` / `_max` (its per-class thresholds, over the classes some sample is given).
    """
    reason, refused = scores.ood_fallback_reason, scores.relabel_refused_reason
    summary: dict[str, float | int | str | None] = {"ood_fallback": bool(reason), "relabel_refused": bool(refused)}
    warnings = []
    if reason:
        summary.update(ood_fallback_reason=reason, ood_fallback_rule=FALLBACK_OOD_RULE)
        warnings.append(
            f"the fitted OOD threshold was not used: {reason}. The `ood` decisions follow a conservative fallback "
            f"instead ({FALLBACK_OOD_RULE}); read the OOD scores as a ranking, not as a decision."
        )
    if refused:
        summary["relabel_refused_reason"] = refused
        warnings.append(f"{refused}; read `label_quality` as a ranking, not as a decision.")
    if warnings and decision_rule == "fitted":
        summary["warning"] = " ".join(w[0].upper() + w[1:] if k else w for k, w in enumerate(warnings))
    summary.update({f"ood_fit_{key}": getattr(scores.ood_fit, key) for key in ("separation", "dip", "weight")})
    summary["ood_fit_share"] = scores.ood_fit.flagged_share
    summary["label_evidence"] = scores.label_evidence
    if scores.label_evidence_note:
        summary["label_evidence_note"] = scores.label_evidence_note
    summary["label_issue_share"] = scores.label_issue_share
    finite = scores.label_thresholds[np.isfinite(scores.label_thresholds)]  # K of them: 5,000 on WebVision V2
    for name, value in (("min", np.min), ("median", np.median), ("max", np.max)):
        summary[f"label_threshold_{name}"] = float(value(finite)) if len(finite) else None
    return summary


def pseudo_labels(report) -> dict[str, list]:
    """The official `pseudo_label.json` content: the ids (relative paths when known) of the kept samples with their
    suggested labels."""
    names = report["id"]
    decision, suggested = report["decision"], report["suggested_label"]
    kept = [i for i, d in enumerate(decision) if d != "ood"]
    return {"images": [names[i] for i in kept], "labels": [int(suggested[i]) for i in kept]}


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
    options: NoiseReportOptions,
    *,
    data_description: str | None = None,
    model_name: str | None = None,
    passed_over: Mapping[str, int] | None = None,
    id_root: str | os.PathLike | None = None,
    id_column: str | None = None,
) -> dict[str, float | int | str | None]:
    """Builds the report and writes it to `output_dir` as a `datasets` dataset (`datasets.load_from_disk`), with its
    dataset card (README.md), `pseudo_label.json`, `noise_report_summary.json` and `noise_report.png`; and, unless
    `flagged_images_per_class` is 0, the flagged samples' thumbnails as the `flagged_images` configuration
    (`flagged_images/`, a `datasets` folder with an `Image` column) and the gallery page `index.html` (with
    `gallery/`), at most `flagged_images_per_class` relabelled and as many OOD samples per given class, by score,
    `thumbnail_size` px a side (`evaluation.gallery`). Their total size is printed.

    `model_name` names the scoring model on the card (default: the model's `name_or_path`); a local folder is named
    by its absolute path, so the card says which model on this machine wrote it (`push_noise_report` names the
    Hub repo or the folder's name instead).

    `id_root` / `id_column`: where the report's `id`s come from (`with_report_ids`; the summary's `ids` says what
    they are). When the OOD fit is not trusted (`evaluation.noise_scores.check_ood_fit`), the summary's `warning`,
    the card, the gallery page and the printed output say why and which fallback rule decided.

    In several processes, each scores its share (see `build_noise_report`) and the main process writes the files.

    Returns:
        The summary (in every process).
    """
    flagged_images_per_class, thumbnail_size = options.flagged_images_per_class, options.thumbnail_size
    if flagged_images_per_class < 0 or thumbnail_size < 1:
        raise ValueError(
            f"flagged_images_per_class must be >= 0 and thumbnail_size >= 1, got {flagged_images_per_class} and "
            f"{thumbnail_size}"
        )
    model = load_model(model, options.device)
    dataset, id_column, id_source = with_report_ids(dataset, options.image_column, id_root, id_column)
    report, skipped, scores = _build_noise_report(model, dataset, options, id_column)
    summary = None
    if report is not None:  # the main process
        output_dir = Path(output_dir)
        if any((output_dir / name).exists() for name in _MODEL_FILES):
            raise FileExistsError(f"{output_dir} is a model folder: a noise report is never written into one")
        output_dir.mkdir(parents=True, exist_ok=True)
        summary = summarize_noise_report(report, model.config, options.decision_rule)
        summary.update(
            num_neighbours=options.num_neighbours, ids=id_source, **fit_summary(scores, options.decision_rule)
        )
        if summary.get("warning"):
            print(f"noise report: WARNING: {summary['warning']}")
        # Undecodable images have no row; the summary counts and names them (training skipped them too).
        summary.update(num_skipped_images=len(skipped), skipped_images=skipped)
        if passed_over is not None:  # files the folder reader passed over (not images, not regular files), by reason
            summary.update(num_passed_over_files=sum(passed_over.values()), passed_over_files=dict(passed_over))
        id2label = getattr(model.config, "id2label", None) or {}
        names = [str(id2label.get(i, i)) for i in range(model.config.num_labels)]
        report = report.cast_column("given_label", datasets.ClassLabel(names=names))
        report = report.cast_column("suggested_label", datasets.ClassLabel(names=names))
        report.save_to_disk(str(output_dir))
        (output_dir / "pseudo_label.json").write_text(json.dumps(pseudo_labels(report)))
        (output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        plot_noise_report(report, output_dir / PLOT_FILE, model.config.num_labels, names)
        model_name = model_name or getattr(model.config, "name_or_path", "")
        if model_name and Path(model_name).exists():  # a folder of this machine: which one, unambiguously
            model_name = str(Path(model_name).resolve())
        scorer = f"the MoPro model `{model_name}`" if model_name else "a MoPro model that was not saved"
        flagged = None
        for stale in (output_dir / FLAGGED_CONFIG, output_dir / THUMBNAIL_DIR, output_dir / GALLERY_FILE):
            if stale.is_dir():  # an overwritten report keeps none of the last one's images
                shutil.rmtree(stale)
            elif stale.exists():
                stale.unlink()
        if flagged_images_per_class:
            images = dataset  # the scored data, undecoded; its ids are the report's, which drops undecodable images
            if isinstance(dataset, datasets.Dataset):
                images = hf_image_dataset(dataset, None, options.image_column, options.label_column, id_column)
            position = {sample_id: k for k, sample_id in enumerate(images.ids)}
            sources = images.subset([position[sample_id] for sample_id in report["id"]]).images
            flagged = flagged_images_dataset(
                report, flagged_rows(report, flagged_images_per_class), sources, thumbnail_size
            )
            flagged.save_to_disk(str(output_dir / FLAGGED_CONFIG))
            write_gallery(
                report, flagged, summary, names, output_dir, scorer, flagged_images_per_class, thumbnail_size,
                data_description,
            )  # fmt: skip
            size = folder_size([output_dir / FLAGGED_CONFIG, output_dir / THUMBNAIL_DIR, output_dir / GALLERY_FILE])
            print(
                f"noise report: {len(flagged)} flagged images (at most {flagged_images_per_class} relabelled and "
                f"{flagged_images_per_class} OOD per class, {thumbnail_size}-px JPEG thumbnails), "
                f"{size / 1e6:.2f} MB in {FLAGGED_CONFIG}/, {THUMBNAIL_DIR}/ and {GALLERY_FILE}"
            )
        card = noise_report_card(
            report, summary, names, scorer, data_description,
            flagged_images=None if flagged is None else len(flagged),
            flagged_images_per_class=flagged_images_per_class, thumbnail_size=thumbnail_size,
        )  # fmt: skip
        (output_dir / "README.md").write_text(card)
    return broadcast_object_list([summary])[0]  # in several processes: waits only for the main process's writing


def hub_card(card: str, model_repo_id: str | None = None, page: str | None = None) -> tuple[str, str | None]:
    """The dataset card and the gallery `page` as pushed: the scoring model named by its Hub repo id
    (`model_repo_id`) or, without one, by its folder's name, never by the path of the machine that wrote the report.
    """
    match = re.search(r"Scored by the MoPro model `([^`]+)`", card)
    if match is None:
        return card, page
    local = match.group(1)
    public = model_repo_id or (Path(local).name if Path(local).is_absolute() else local)
    card = card.replace(f"`{local}`", f"`{public}`")
    if page is not None:  # the gallery writes the name as the card does, in a <code> span
        page = page.replace(f"<code>{html.escape(local)}</code>", f"<code>{html.escape(public)}</code>")
    return card, page


def push_noise_report(
    output_dir: str | os.PathLike, repo_id: str, private: bool = False, model_repo_id: str | None = None
) -> str:
    """Publishes a written report as the dataset repo `repo_id`: its rows (parquet, the `default` configuration),
    the flagged samples' thumbnails (the `flagged_images` configuration, shown by the Hub's dataset viewer), the
    gallery page and thumbnails, card, plot and summary. The card names the model by `model_repo_id` (or the
    folder's name: `hub_card`).

    Returns:
        The dataset's URL. The summary file then records it (`dataset_repo`), and a release of the model links it.
    """
    from huggingface_hub import HfApi

    from .release import check_hub_login, check_hub_reachable

    check_hub_reachable(output="noise report")
    check_hub_login(output="noise report")
    output_dir = Path(output_dir)
    datasets.load_from_disk(str(output_dir)).push_to_hub(repo_id, private=private)
    if (output_dir / FLAGGED_CONFIG).is_dir():  # parquet under flagged_images/, as the card's `configs` say
        datasets.load_from_disk(str(output_dir / FLAGGED_CONFIG)).push_to_hub(
            repo_id, config_name=FLAGGED_CONFIG, private=private
        )
    api = HfApi()
    # The card last: push_to_hub rewrites README.md, and ours lists both configurations.
    gallery_page = output_dir / GALLERY_FILE
    card, page = hub_card(
        (output_dir / "README.md").read_text(),
        model_repo_id,
        gallery_page.read_text(encoding="utf-8") if gallery_page.is_file() else None,
    )
    if page is not None:
        api.upload_file(path_or_fileobj=page.encode(), path_in_repo=GALLERY_FILE, repo_id=repo_id, repo_type="dataset")
    for name in (PLOT_FILE, SUMMARY_FILE, "pseudo_label.json"):
        if (output_dir / name).is_file():
            api.upload_file(
                path_or_fileobj=str(output_dir / name), path_in_repo=name, repo_id=repo_id, repo_type="dataset"
            )
    if (output_dir / THUMBNAIL_DIR).is_dir():
        api.upload_folder(
            folder_path=str(output_dir / THUMBNAIL_DIR), path_in_repo=THUMBNAIL_DIR, repo_id=repo_id,
            repo_type="dataset",
        )  # fmt: skip
    api.upload_file(path_or_fileobj=card.encode(), path_in_repo="README.md", repo_id=repo_id, repo_type="dataset")
    summary = json.loads((output_dir / SUMMARY_FILE).read_text())
    summary["dataset_repo"] = repo_id
    (output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return f"https://huggingface.co/datasets/{repo_id}"


def _is_noise_report(folder: Path) -> bool:
    return (folder / SUMMARY_FILE).is_file() or (folder / "state.json").is_file()


# Files of a model folder (`save_pretrained`, a release): a report written there would replace the model card
# (README.md) and mix its dataset files with the model's.
_MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "preprocessor_config.json")


def check_report_folder(output_dir: str | os.PathLike, overwrite: bool = False) -> None:
    """A report is written only into a new or empty folder, or over an earlier report with `overwrite`; never into a
    model folder (even with `overwrite`: its README.md is the model card) or a folder of anything else.

    Raises:
        NotADirectoryError: It is a file.
        FileExistsError: The folder holds a model, an earlier report (without `overwrite`), or other files.
    """
    folder = Path(output_dir)
    model_files = [name for name in _MODEL_FILES if (folder / name).exists()]
    if model_files:
        raise FileExistsError(
            f"--output_dir {folder} is a model folder (it holds {', '.join(model_files)}): the report would replace "
            "its model card (README.md); leave --output_dir out (the report goes to MODEL/noise_report) or pass "
            "another folder"
        )
    report = folder.is_dir() and _is_noise_report(folder)  # only an earlier report may be replaced
    held = lambda f: sorted(p.name for p in f.iterdir())  # noqa: E731
    what = "a noise report ({names})" if report else "files that are not a noise report ({names})"
    check_output_dir(folder, overwrite, held, what, overwrite_flag="--overwrite" if report else None)


def _load_data(args, model) -> tuple[object, str]:
    """The dataset named by the arguments (every source the trainer reads) and a one-line description of it."""
    formats = (*DATA_FORMATS, "webvision", "shards")  # keep `datasets` data raw: its ground truth goes in the report
    dataset, _ = dataset_from_arguments(args, transforms_from_config(model.config), "", "train", formats, True)
    if args.data_format not in ("webvision", "shards", "hf"):
        return dataset, str(args.data_dir)
    kind = "`datasets`" if args.data_format == "hf" else args.data_format
    return dataset, f"{kind} {args.data_dir} ({args.split or 'train'} split)"


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="saved MoPro folder")
    parser.add_argument("--output_dir", default=None, help="the report's folder (default: MODEL/noise_report)")
    parser.add_argument("--overwrite", action="store_true", help="replace a report already in --output_dir")
    parser.add_argument("--decision_rule", choices=DECISION_RULES, default="fitted",
                        help="fitted: thresholds fitted to this data's scores; training: the training rule's constants")  # fmt: skip
    parser.add_argument("--label_evidence", choices=LABEL_EVIDENCE, default="combined",
                        help="what the label decisions read: combined: the mean of the neighbour vote and the "
                        "training run's per-sample record when it matches the data, else the vote alone; training: "
                        "the record alone, or an error; neighbours: the vote alone")  # fmt: skip
    parser.add_argument("--sample_dynamics", default=None,
                        help="the training run's record (default: MODEL/sample_dynamics.safetensors)")  # fmt: skip
    parser.add_argument("--num_neighbours", type=positive_int, default=50, help="k of the neighbour vote")
    parser.add_argument("--max_reference", type=positive_int, default=200_000,
                        help="neighbours are searched among at most this many samples (seeded subset)")  # fmt: skip
    parser.add_argument("--push_to_hub", metavar="REPO", default=None, help="publish the report as this dataset repo")
    parser.add_argument("--model_repo_id", default=None,
                        help="with --push_to_hub: the model's Hub repo, named on the pushed card (default: its folder's name)")  # fmt: skip
    parser.add_argument("--flagged_images_per_class", type=int, default=DEFAULT_PER_CLASS,
                        help="thumbnails of at most this many relabelled and as many OOD samples per class, by score, "
                        "in the flagged_images configuration and index.html (0: none)")  # fmt: skip
    parser.add_argument("--thumbnail_size", type=positive_int, default=DEFAULT_THUMBNAIL_SIZE,
                        help="the thumbnails' longest side, in pixels")  # fmt: skip
    parser.add_argument("--private", action="store_true", help="with --push_to_hub: a private dataset repo")
    parser.add_argument("--batch_size", type=positive_int, default=256)
    parser.add_argument("--num_workers", type=int, default=8)
    parser.add_argument("--device", default=None)
    parser.add_argument("--amp", action="store_true")
    add_dataset_arguments(parser, formats=(*DATA_FORMATS, "webvision", "shards"))
    parser.add_argument("--webvision_version", default="v1", choices=("v1", "v2"))
    args = parser.parse_args(argv)
    output_dir = Path(args.output_dir or Path(args.model_name_or_path) / "noise_report")
    if args.flagged_images_per_class < 0:
        raise ValueError(
            f"--flagged_images_per_class must be >= 0 (0: no images), got {args.flagged_images_per_class}"
        )
    if args.push_to_hub:  # before any work: offline or logged out, pushing fails now, not after scoring
        from .release import check_hub_login, check_hub_reachable, check_repo_id

        check_repo_id(args.push_to_hub, "--push_to_hub")
        check_hub_reachable(output="noise report")
        check_hub_login(output="noise report")
    check_report_folder(output_dir, args.overwrite)

    # Under `accelerate launch`, this joins the process group (one device per process); alone, it does nothing.
    state = PartialState()
    device = args.device or (state.device if state.num_processes > 1 else None)
    model = load_model(args.model_name_or_path, device)
    dataset, description = _load_data(args, model)
    # The data's columns were renamed to "image" / "label" when it was read (`_load_data`).
    options = NoiseReportOptions.from_args(args, device=device, image_column="image", label_column="label")
    summary = write_noise_report(
        model, dataset, output_dir, options, data_description=description,
        passed_over=passed_over_counts(args.data_dir) if args.data_format == "imagefolder" else None,
        id_column=args.id_column,
        id_root=args.data_dir if args.data_format in ("imagefolder", "webvision_val") else None,  # paths under it
    )  # fmt: skip
    if state.is_main_process:
        if args.push_to_hub:
            url = push_noise_report(output_dir, args.push_to_hub, args.private, args.model_repo_id)
            summary["dataset_repo"] = args.push_to_hub
            print(f"published {url}")
        print(json.dumps(summary, indent=2))
    return summary


__all__ = [
    "DECISIONS",
    "DECISION_RULES",
    "LABEL_EVIDENCE",
    "NoiseReportOptions",
    "build_noise_report",
    "fit_summary",
    "hub_card",
    "label_evidence",
    "noise_decisions",
    "plot_noise_report",
    "pseudo_labels",
    "push_noise_report",
    "summarize_noise_report",
    "with_report_ids",
    "write_noise_report",
]

if __name__ == "__main__":
    from modeling_mopro.cli import run_command

    run_command(main)
