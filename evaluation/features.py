"""Shared pieces of the evaluation protocols: model loading, batched feature extraction and result files.

`extract_features` runs the backbone once per batch and derives everything a protocol may need from the pooled
features: the L2-normalised embedding, the cosine similarity to every class prototype and the classifier logits.
It works on a `MoProModel`, `MoProForImageClassification` or `MoProForPreTraining` (all share `mopro.*` and
`classifier.*`), in memory or loaded from a folder.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

FEATURE_KINDS = ("pooled", "embeddings", "prototype_similarities", "logits")


@dataclass(frozen=True)
class FeatureOptions:
    """How a protocol runs the model (`extract_features`); each protocol's options dataclass adds its own fields.
    A script builds it from its arguments (`from_args`: every field from the flag of its name)."""

    batch_size: int = 256
    num_workers: int = 8
    device: str | torch.device | None = None  # default: CUDA when available
    amp: bool = False  # bfloat16 autocast for the backbone

    def extraction(self) -> dict[str, Any]:
        """The keyword arguments of `extract_features`."""
        return {"batch_size": self.batch_size, "num_workers": self.num_workers, "device": self.device, "amp": self.amp}

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides: Any):
        """The options from parsed arguments: each field from the argument of its name (a field without one keeps its
        default), then `overrides`."""
        return cls(**{**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}, **overrides})


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The given device, else CUDA when available, else CPU."""
    if device is not None:
        try:
            device = torch.device(device)
        except RuntimeError as error:  # "Expected one of cpu, cuda, ... device type at start of device string"
            raise ValueError(f"--device {device}: not a device ({error})") from error
        available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}
        if device.type in available and not available[device.type]():
            raise ValueError(f"--device {device}: no {device.type} device on this machine; use --device cpu")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(
    model_or_path: str | os.PathLike | nn.Module, device: str | torch.device | None = None, **from_pretrained_kwargs
) -> nn.Module:
    """Loads a saved MoPro folder (or takes a model in memory) and puts it in eval mode on `device`.

    A folder saved from `MoProModel` loads as such (no classifier); any other MoPro folder (release model or
    pre-training checkpoint, whose momentum encoder and queue are then ignored) loads as
    `MoProForImageClassification`, which holds everything the protocols use.
    """
    if isinstance(model_or_path, nn.Module):
        return model_or_path.to(resolve_device(device)).eval()
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

    import modeling_mopro  # noqa: F401  (registers the MoPro Auto classes)

    device = resolve_device(device)  # a device this machine lacks is refused before any loading
    config = AutoConfig.from_pretrained(model_or_path)
    _check_label_count(model_or_path)
    architecture = (getattr(config, "architectures", None) or [""])[0]
    auto_class = AutoModel if architecture == "MoProModel" else AutoModelForImageClassification
    try:
        model = auto_class.from_pretrained(model_or_path, **from_pretrained_kwargs)
    except SafetensorError as error:  # a truncated or garbled weights file
        raise ValueError(
            f"{model_or_path}: the weights cannot be read ({error}; the file is cut short or not safetensors)"
        ) from error
    except RuntimeError as error:
        if "mismatched" not in str(error):
            raise
        raise ValueError(
            f"{model_or_path}: the weights do not fit its config.json (tensor shapes differ; was config.json edited?)"
        ) from error
    return model.to(device).eval()


def _check_label_count(folder: str | os.PathLike) -> None:
    """A config.json whose `num_labels` disagrees with its `id2label` describes no model (transformers would build a
    classifier of one size and fail on weights of the other)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return
    raw = json.loads(path.read_text())
    if "num_labels" in raw and isinstance(raw.get("id2label"), dict) and raw["num_labels"] != len(raw["id2label"]):
        raise ValueError(
            f"{path}: num_labels {raw['num_labels']} but id2label names {len(raw['id2label'])} classes; make them agree"
        )


def mopro_parts(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """(The `MoProModel` with backbone/projection/prototypes, the classifier or None) of any MoPro class."""
    base = getattr(model, "mopro", model)
    if not all(hasattr(base, name) for name in ("backbone", "projection", "prototypes")):
        raise TypeError(f"{type(model).__name__} is not a MoPro model (no backbone / projection / prototypes)")
    return base, getattr(model, "classifier", None)


@dataclass
class FeatureSet:
    """Outputs of `extract_features`, row-aligned with the dataset order (float32 numpy arrays).

    Attributes:
        pooled: (N, F) pooled backbone features, or None if not requested.
        embeddings: (N, D) L2-normalised projections, or None.
        prototype_similarities: (N, K) cosine similarity of each embedding to each class prototype, or None.
        logits: (N, K) classifier logits, or None (not requested, or a `MoProModel` without classifier).
        labels: (N,) integer labels, or (N, C) multi-label targets.
        ids: N sample ids (the dataset's `ids`, else the positions).
        skipped_ids: ids of the samples left out because their image could not be decoded (logged as skipped).
    """

    pooled: np.ndarray | None
    embeddings: np.ndarray | None
    prototype_similarities: np.ndarray | None
    logits: np.ndarray | None
    labels: np.ndarray
    ids: list[str]
    skipped_ids: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)


def build_loader(dataset: Dataset, batch_size: int, num_workers: int, device: torch.device) -> DataLoader:
    """Ordered, non-dropping evaluation DataLoader; an `ImageLabelDataset`'s undecodable images are left out of the
    batches and listed in their ``skipped_index`` (`collate_skipping_bad_images`)."""
    from training.data.image_datasets import ImageLabelDataset, collate_skipping_bad_images

    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        collate_fn=collate_skipping_bad_images if isinstance(dataset, ImageLabelDataset) else None,
    )


@torch.inference_mode()
def extract_features(
    model: nn.Module,
    dataset: Dataset,
    kinds: Sequence[str] = FEATURE_KINDS,
    batch_size: int = 128,
    num_workers: int = 4,
    device: str | torch.device | None = None,
    amp: bool = False,
    desc: str = "features",
    progress: bool = True,
) -> FeatureSet:
    """Batched, ordered forward pass of `dataset` through a MoPro model.

    Args:
        model: Any MoPro model class (or a `MoProModel`); evaluated in eval mode, its mode is restored after.
        dataset: Yields dicts with `pixel_values` (3, S, S), `labels` and optionally `index` (an
            `ImageLabelDataset`), or `(pixel_values, label)` tuples.
        kinds: Which of `FEATURE_KINDS` to keep (the backbone runs once whatever is asked).
        batch_size: Images per forward pass.
        num_workers: DataLoader worker processes (image decoding and transforms run there).
        device: Defaults to CUDA when available.
        amp: Run the forward pass under bfloat16 autocast (outputs are returned as float32).
        desc: Progress bar label.
        progress: Show a tqdm progress bar.

    Returns:
        A `FeatureSet`; the entries not in `kinds` are None.
    """
    unknown = set(kinds) - set(FEATURE_KINDS)
    if unknown:
        raise ValueError(f"unknown feature kinds {sorted(unknown)}; choose from {FEATURE_KINDS}")
    device = resolve_device(device)
    base, classifier = mopro_parts(model)
    if "logits" in kinds and classifier is None:
        kinds = [k for k in kinds if k != "logits"]
    was_training = model.training
    model.to(device).eval()
    outputs: dict[str, list[torch.Tensor]] = {k: [] for k in kinds}
    labels, indices, skipped = [], [], []
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    loader = build_loader(dataset, batch_size, num_workers, device)
    try:
        for batch in tqdm(loader, desc=desc, disable=not progress):
            if isinstance(batch, dict) and "skipped_index" in batch:
                skipped += batch["skipped_index"].tolist()
                if "pixel_values" not in batch:  # every image of the batch was undecodable
                    continue
            if isinstance(batch, dict):
                pixel_values, batch_labels = batch["pixel_values"], batch["labels"]
                batch_index = batch.get("index")
            else:
                (pixel_values, batch_labels), batch_index = batch[:2], None
            with autocast:
                pooled = base.backbone(pixel_values.to(device, non_blocking=True))  # (B, F)
            # The heads in their own (fp32) dtype, as in training: bf16 logits would move the soft scores that the
            # noise report compares with 1/K. The projection head leaves autocast by itself.
            embeddings = base.projection(pooled)  # (B, D), L2-normalised
            logits = classifier(pooled.to(classifier.weight.dtype)) if "logits" in kinds else None  # (B, K)
            computed = {"pooled": pooled, "embeddings": embeddings, "logits": logits}
            if "prototype_similarities" in kinds:
                computed["prototype_similarities"] = embeddings.float() @ base.prototypes.float().T  # (B, K)
            for kind in kinds:
                outputs[kind].append(computed[kind].float().cpu())
            labels.append(torch.as_tensor(batch_labels))
            if batch_index is not None:
                indices.append(batch_index)
    finally:
        model.train(was_training)
    arrays = {k: torch.cat(v).numpy() if v else None for k, v in outputs.items()}
    positions = torch.cat(indices).tolist() if indices else list(range(len(dataset)))
    dataset_ids = getattr(dataset, "ids", None)

    def name(position: int) -> str:
        return dataset_ids[position] if dataset_ids is not None else str(position)

    ids = [name(i) for i in positions]
    if skipped:  # each one was logged by the worker that met it; this is the count, in the main process
        examples = ", ".join(name(i) for i in skipped[:5])
        logger.warning(
            "%s: skipped %d undecodable image(s) of %d, e.g. %s", desc, len(skipped), len(dataset), examples
        )
    return FeatureSet(
        pooled=arrays.get("pooled"),
        embeddings=arrays.get("embeddings"),
        prototype_similarities=arrays.get("prototype_similarities"),
        logits=arrays.get("logits"),
        labels=torch.cat(labels).numpy() if labels else np.zeros(0, dtype=np.int64),
        ids=ids,
        skipped_ids=[name(i) for i in skipped],
    )


def l2_normalize(features: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """Row-wise `x / (||x|| + eps)`, as the official low-shot SVM script normalises features."""
    return features / (np.linalg.norm(features, axis=1, keepdims=True) + eps)


# ------------------------------------------------------------------------------------------------- results
def save_eval_results(
    output_dir: str | os.PathLike,
    protocol: str,
    metrics: dict[str, float],
    dataset_name: str,
    dataset_type: str,
    dataset_key: str | None = None,
    task: str = "image-classification",
    metadata: dict[str, str] | None = None,
) -> Path:
    """Writes `eval_<protocol>[_<dataset_key>].json`: a flat dict of metric name -> number plus the string keys
    "dataset_name", "dataset_type" and "task" (the convention the release / model-card step reads), and any
    further descriptive string keys in `metadata` (e.g. the AP definition).

    Raises:
        ValueError: A metric is not a finite number.
    """
    flat: dict[str, float | int | str] = {}
    for name, value in metrics.items():
        value = int(value) if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else float(value)
        if not math.isfinite(value):
            raise ValueError(f"metric {name!r} is not finite: {value}")
        flat[name] = value
    flat.update({str(k): str(v) for k, v in (metadata or {}).items()})
    flat.update(dataset_name=dataset_name, dataset_type=dataset_type, task=task)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / f"eval_{protocol}{f'_{dataset_key}' if dataset_key else ''}.json"
    path.write_text(json.dumps(flat, indent=2) + "\n")
    return path


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments every protocol script shares."""
    parser.add_argument("--model_name_or_path", required=True, help="saved MoPro folder")
    parser.add_argument("--output_dir", default=None, help="where eval_*.json goes (default: the model folder itself)")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--num_workers", type=int, default=8)
    parser.add_argument("--device", default=None, help="default: cuda if available")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast for feature extraction")


def results_dir(args: argparse.Namespace) -> str:
    return args.output_dir or args.model_name_or_path


__all__ = [
    "FEATURE_KINDS",
    "FeatureOptions",
    "FeatureSet",
    "add_model_arguments",
    "build_loader",
    "extract_features",
    "l2_normalize",
    "load_model",
    "mopro_parts",
    "resolve_device",
    "results_dir",
    "save_eval_results",
]
