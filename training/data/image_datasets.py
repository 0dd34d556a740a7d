"""The evaluation protocols' datasets: every layout becomes an `ImageLabelDataset`.

An `ImageLabelDataset` yields `{"pixel_values": (3, S, S), "labels": () long or (C,) float, "index": ()}` and keeps
one string id per sample (a path relative to the data root, or a `datasets` id column), so protocols can report
per-sample results. Images are decoded lazily (in DataLoader workers) with the project's tolerant decoder, and go
through the test view (`training.data.transforms.evaluation_view`) by default.

Image folders, WebVision (lists or its val layout), `make_shards` folders and `datasets` data are read by the one
source dispatcher, `training.data.sources.load_source` (`image_dataset`, `dataset_from_arguments`), as in training.
Read here, besides:
- a list of relative paths and labels (`pseudo_label.json`, Places205 csv files, subsets);
- PASCAL VOC2007: `root/VOCdevkit/VOC2007/{ImageSets/Main/<class>_<split>.txt, JPEGImages/}`; labels (20,) in
  {1 positive, 0 difficult, -1 negative}, as the devkit writes them;
- Places205: `root/trainvalsplit_places205/{train,val}_places205.csv` ("path label", space separated) and the
  images under `root/data/vision/torralba/deeplearning/images256/` (the official `Places_dataset.py` layout).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from .image_folder import passed_over_counts
from .sources import is_saved_dataset, load_source, with_webvision_paths
from .transforms import MoProViewTransforms, decode_or_skip
from .webvision import VAL_FILELIST, VAL_IMAGE_DIR, read_webvision_filelist

VOC07_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
DATA_FORMATS = ("auto", "imagefolder", "webvision_val", "hf")

Transform = Callable[[Any], torch.Tensor]


class ImageLabelDataset(Dataset):
    """Images with single labels (long) or multi-label targets (float rows), decoded lazily.

    Args:
        images: Indexable sequence of image sources: paths, encoded bytes, `datasets.Image(decode=False)` dicts
            or PIL images (anything `training.data.transforms.decode_image` accepts).
        labels: (N,) integer labels, or (N, C) multi-label targets.
        ids: N string ids (relative paths by default). Defaults to the sample positions.
        transform: Maps a decoded RGB PIL image to a tensor; the test view at 224 px when None.
        classes: Optional class names, in label order.
    """

    def __init__(
        self,
        images: Sequence[Any],
        labels: np.ndarray | Sequence[int],
        ids: Sequence[str] | None = None,
        transform: Transform | None = None,
        classes: Sequence[str] | None = None,
    ) -> None:
        self.images = images
        self.labels = np.asarray(labels)
        if self.labels.ndim == 1:
            self.labels = self.labels.astype(np.int64)
        self.ids = [str(i) for i in ids] if ids is not None else [str(i) for i in range(len(self.labels))]
        if not (len(images) == len(self.labels) == len(self.ids)):
            raise ValueError(f"images ({len(images)}), labels ({len(self.labels)}) and ids ({len(self.ids)}) differ")
        self.transform = transform or MoProViewTransforms().test
        self.classes = list(classes) if classes is not None else None
        # Entries of an image folder its reader passed over, by reason (`training.data.image_folder`); None otherwise.
        self.passed_over: dict[str, int] | None = None

    @property
    def is_multilabel(self) -> bool:
        return self.labels.ndim == 2

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        """The sample's views, or only ``{"index"}`` when its image cannot be decoded (a skip, logged with the id;
        `collate_skipping_bad_images` drops and counts it)."""
        image = decode_or_skip(self.images[index], f"image {self.ids[index]}")
        if image is None:
            return {"index": torch.tensor(index)}
        label = torch.as_tensor(self.labels[index], dtype=torch.float32 if self.is_multilabel else torch.long)
        return {"pixel_values": self.transform(image), "labels": label, "index": torch.tensor(index)}

    def subset(self, indices: Sequence[int] | np.ndarray, labels: np.ndarray | None = None) -> ImageLabelDataset:
        """A dataset of the given rows (repeats allowed), optionally with new labels for them."""
        indices = np.asarray(indices, dtype=np.int64)
        return ImageLabelDataset(
            _Rows(self.images, indices),
            self.labels[indices] if labels is None else labels,
            [self.ids[i] for i in indices],
            self.transform,
            self.classes,
        )


class _Rows:
    """A lazy row selection of an indexable sequence (keeps a `datasets` column undecoded until read)."""

    def __init__(self, base: Sequence[Any], indices: np.ndarray) -> None:
        self.base, self.indices = base, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.base[int(self.indices[i])]


class _HFColumn:
    """Row access `ds[i][column]` to a `datasets.Dataset`: one image decoded at a time, in the worker."""

    def __init__(self, dataset, column: str) -> None:
        self.dataset, self.column = dataset, column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[int(i)][self.column]


def collate_skipping_bad_images(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stacks the decodable samples of `ImageLabelDataset`; ``skipped_index`` holds the positions of the others.

    A batch of only bad images has no ``pixel_values`` / ``labels`` keys.
    """
    good = [e for e in examples if "pixel_values" in e]
    batch = default_collate(good) if good else {}
    batch["skipped_index"] = torch.tensor([int(e["index"]) for e in examples if "pixel_values" not in e])
    return batch


def collate_without_index(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Trainer collator: `collate_skipping_bad_images` without the sample index (not a model input) and the skips
    (already logged with their ids by `ImageLabelDataset`)."""
    batch = collate_skipping_bad_images(examples)
    if "pixel_values" not in batch:
        raise ValueError("every image of a batch is undecodable (see the warnings above); fix or remove the files")
    return {"pixel_values": batch["pixel_values"], "labels": batch["labels"]}


# ----------------------------------------------------------------------------------------------------- layouts
def check_class_names(dataset: Any, config: Any, source: str = "the evaluation data") -> None:
    """Checks that a dataset's labels mean the model's classes: its class names are ``config.id2label``, in order.

    For the protocols that score the model's own classifier (classification, the noise report, the evaluation sets
    of classifier retraining); kNN, the low-shot SVM and fine-tuning learn their own label space and skip it, and
    robustness maps its folders to the model's logits explicitly (`robustness.subset_logit_indices`).
    Nothing is compared when the data has no class names (file lists, integer label columns), when they are the
    label indices themselves ("0", "1", ...: the official `imagenet/val/<c>/` layout), or when the model's labels are
    the generic "LABEL_<i>"; then only the class count is checked.

    Raises:
        ValueError: More classes than the model has, or names that differ (a few are named).
    """
    classes = getattr(dataset, "classes", None)
    num_labels = config.num_labels
    labels = getattr(dataset, "labels", None)
    if labels is not None and np.ndim(labels) == 1 and len(labels) and int(np.max(labels)) >= num_labels:
        raise ValueError(f"{source} has label {int(np.max(labels))} but the model has {num_labels} classes")
    if classes is None:
        return
    classes = [str(name) for name in classes]
    if len(classes) > num_labels:
        raise ValueError(f"{source} has {len(classes)} classes but the model has {num_labels}")
    model_names = [str(config.id2label.get(i, f"LABEL_{i}")) for i in range(num_labels)]
    if classes == [str(i) for i in range(len(classes))] or model_names == [f"LABEL_{i}" for i in range(num_labels)]:
        return
    if classes != model_names:
        raise ValueError(
            f"the class names of {source} are not the model's labels (config.id2label): "
            f"{_class_name_differences(classes, model_names, 'in the data', 'in the model') or f'{len(classes)} classes for {num_labels} labels'}; "
            "evaluate on data with the model's classes, in the model's order"
        )


def _class_name_differences(names: list[str], reference: list[str], where: str, reference_where: str) -> str:
    """The first three labels whose names differ (`label i: 'a' <where>, 'b' <reference_where>`, + how many more);
    empty when every label the two lists share agrees (then only their lengths differ)."""
    differing = [(i, a, b) for i, (a, b) in enumerate(zip(names, reference, strict=False)) if a != b]
    shown = "; ".join(f"label {i}: {a!r} {where}, {b!r} {reference_where}" for i, a, b in differing[:3])
    return shown + (f" (+{len(differing) - 3} more)" if len(differing) > 3 else "")


def check_same_classes(
    train: Any, test: Any, train_source: str = "the training data", test_source: str = "the evaluation data"
) -> None:
    """Checks that two datasets' labels mean the same classes, for the protocols that learn their label space from
    the training data (kNN, fine-tuning): the evaluation data's class names must be the training data's, in order.
    Nothing is compared when either side has no class names.

    Raises:
        ValueError: Names that differ (a few are named).
    """
    train_classes, test_classes = getattr(train, "classes", None), getattr(test, "classes", None)
    if train_classes is None or test_classes is None:
        return
    train_classes, test_classes = [str(c) for c in train_classes], [str(c) for c in test_classes]
    if train_classes == test_classes:
        return
    raise ValueError(
        f"the class names of {test_source} are not those of {train_source}: "
        f"{_class_name_differences(train_classes, test_classes, 'in training', 'in evaluation') or f'{len(test_classes)} classes for {len(train_classes)}'}; "
        "give both the same class folders (or the same label names)"
    )


def file_list_dataset(
    root: str | os.PathLike,
    relative_paths: Sequence[str],
    labels: Sequence[int] | np.ndarray,
    transform: Transform | None = None,
) -> ImageLabelDataset:
    """Images `root/<relative path>` with the given labels; ids are the relative paths."""
    paths = [os.path.join(root, p) for p in relative_paths]
    return ImageLabelDataset(paths, labels, list(relative_paths), transform)


def read_pseudo_labels(path: str | os.PathLike) -> tuple[list[str], list[int]]:
    """Reads the official `pseudo_label.json`: `{"images": [relative path, ...], "labels": [int, ...]}`."""
    data = json.loads(Path(path).read_text())
    images, labels = list(data["images"]), [int(v) for v in data["labels"]]
    if len(images) != len(labels):
        raise ValueError(f"{path}: {len(images)} images but {len(labels)} labels")
    return images, labels


def pseudo_label_dataset(
    root: str | os.PathLike, annotation: str | os.PathLike, transform: Transform | None = None
) -> ImageLabelDataset:
    """The cleaned training set of classifier retraining: `root/<image>` with the labels of `pseudo_label.json`."""
    images, labels = read_pseudo_labels(annotation)
    missing = [image for image in images if not os.path.isfile(os.path.join(root, image))]
    if missing:  # else every batch of them is skipped, and training fails far from the cause
        raise ValueError(
            f"{annotation}: {len(missing)} of {len(images)} pseudo-labelled images are not files under {root}, e.g. "
            f"{missing[:3]}; give the data the report was made on"
        )
    return file_list_dataset(root, images, labels, transform)


def apply_pseudo_labels(dataset: ImageLabelDataset, annotation: str | os.PathLike) -> ImageLabelDataset:
    """Keeps the samples of `dataset` listed in `pseudo_label.json` (matched on ids) with their new labels."""
    images, labels = read_pseudo_labels(annotation)
    position = {sample_id: i for i, sample_id in enumerate(dataset.ids)}
    missing = [image for image in images if image not in position]
    if missing:  # the user's annotation file and data disagree: a user error (ValueError), not a lookup bug
        raise ValueError(
            f"{annotation}: {len(missing)} pseudo-labelled images are not in the dataset, e.g. {missing[:3]}; give the "
            "data the report was made on"
        )
    return dataset.subset([position[image] for image in images], np.asarray(labels, dtype=np.int64))


def webvision_val_dataset(
    root: str | os.PathLike, transform: Transform | None = None, num_classes: int = 1000
) -> ImageLabelDataset:
    """WebVision validation set (`info/val_filelist.txt`, images in `val_images_256/`), labels < num_classes; the
    list is read by training's reader (`training.data.webvision.read_webvision_filelist`, which names a malformed line)."""
    root = Path(root)
    pairs = read_webvision_filelist(root / "info" / VAL_FILELIST, num_classes)
    relative = [f"{VAL_IMAGE_DIR}/{name}" for name, _ in pairs]
    return file_list_dataset(root, relative, [label for _, label in pairs], transform)


def voc07_dataset(root: str | os.PathLike, split: str = "trainval", transform: Transform | None = None):
    """PASCAL VOC2007 classification: (N, 20) float targets in {1, 0 (difficult), -1}, from the devkit lists."""
    base = Path(root) / "VOCdevkit" / "VOC2007"
    targets: dict[str, np.ndarray] = {}
    for c, name in enumerate(VOC07_CLASSES):
        for line in (base / "ImageSets" / "Main" / f"{name}_{split}.txt").read_text().splitlines():
            if line.strip():
                image, value = line.split()
                targets.setdefault(image, np.zeros(len(VOC07_CLASSES), dtype=np.float32))[c] = float(value)
    images = sorted(targets)
    paths = [str(base / "JPEGImages" / f"{image}.jpg") for image in images]
    return ImageLabelDataset(paths, np.stack([targets[i] for i in images]), images, transform, VOC07_CLASSES)


def places205_dataset(root: str | os.PathLike, split: str = "train", transform: Transform | None = None):
    """Places205 as laid out for the official `Places_dataset.py` (csv "relative/path.jpg label")."""
    root = Path(root)
    relative, labels = [], []
    for line in (root / "trainvalsplit_places205" / f"{split}_places205.csv").read_text().splitlines():
        if line.strip():
            path, label = line.split()[:2]
            relative.append(path)
            labels.append(int(label))
    images_root = root / "data" / "vision" / "torralba" / "deeplearning" / "images256"
    return file_list_dataset(images_root, relative, labels, transform)


def hf_image_dataset(
    dataset,
    transform: Transform | None = None,
    image_column: str = "image",
    label_column: str = "label",
    id_column: str | None = None,
) -> ImageLabelDataset:
    """Wraps a `datasets.Dataset` with an image column and an integer label column.

    Ids come from `id_column`, else from a `path` or `sample_id` column when present, else the row positions.
    """
    feature = dataset.features.get(image_column)
    if isinstance(feature, datasets.Image) and feature.decode:
        # Our decoder, in the workers: a bad file is then a logged skip, not a crash inside `datasets`.
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    if id_column is None:
        id_column = next((c for c in ("path", "sample_id") if c in dataset.column_names), None)
    ids = list(dataset[id_column]) if id_column else None
    names = getattr(dataset.features.get(label_column), "names", None)
    labels = np.asarray(list(dataset[label_column]))
    return ImageLabelDataset(_HFColumn(dataset, image_column), labels, ids, transform, names)


# ----------------------------------------------------------------------------------------------- script glue
def add_dataset_arguments(
    parser: argparse.ArgumentParser, prefix: str = "", required: bool = True, formats: Sequence[str] = DATA_FORMATS
) -> None:
    """Adds `--{prefix}data_dir`, `--{prefix}data_format` (one of `formats`), `--{prefix}split` and the `datasets`
    column names."""
    parser.add_argument(f"--{prefix}data_dir", required=required, help="dataset folder or `datasets` name")
    parser.add_argument(f"--{prefix}data_format", default="auto", choices=formats)
    parser.add_argument(f"--{prefix}split", default=None, help="split of a `datasets` dataset")
    parser.add_argument(f"--{prefix}image_column", default="image")
    parser.add_argument(f"--{prefix}label_column", default="label")
    parser.add_argument(f"--{prefix}id_column", default=None)


def result_key(args: argparse.Namespace) -> str:
    """The name a result is filed under (`--dataset`): as given, or "webvision" for a WebVision val root (the one
    layout that names itself). Never a default: a folder evaluated without `--dataset` would otherwise land in the
    model card as a WebVision result.

    Raises:
        ValueError: No `--dataset` for data that does not name itself.
    """
    if args.dataset:
        return args.dataset
    path = Path(args.data_dir)
    if args.data_format == "webvision_val" or (args.data_format == "auto" and (path / "info" / VAL_FILELIST).exists()):
        return "webvision"
    raise ValueError(
        f"--dataset is required for --data_dir {args.data_dir}: name the data the result is filed under (e.g. "
        "--dataset imagenet); only a WebVision root (info/val_filelist.txt) names itself"
    )


def image_dataset(
    kind: str, root: str | os.PathLike, split: str | None, transform: Transform | None = None, **source
) -> ImageLabelDataset:
    """One split of a source read by the one dispatcher (`sources.load_source`, `**source` its options), as an
    `ImageLabelDataset` whose ids are the files' paths relative to `root` where the layout has files."""
    dataset, _ = load_source(kind, root, split, **source)
    dataset = with_webvision_paths(dataset, root) if kind == "webvision" else dataset
    return _image_label_dataset(dataset, kind, root, transform)


def _image_label_dataset(dataset, kind: str, root, transform: Transform | None, id_column: str | None = None):
    """A dispatcher's `datasets.Dataset` as an `ImageLabelDataset` (ids: `id_column`, else its `path` column where the
    layout has files); an image folder's keeps what its reader passed over."""
    wrapped = hf_image_dataset(dataset, transform, id_column=id_column)
    wrapped.passed_over = passed_over_counts(root) if kind == "imagefolder" else None
    return wrapped


def dataset_from_arguments(
    args: argparse.Namespace,
    transform: Transform,
    prefix: str = "",
    default_split: str = "validation",
    formats: Sequence[str] = DATA_FORMATS,
    keep_datasets: bool = False,
) -> tuple[Any, dict[int, str]]:
    """The dataset of the `add_dataset_arguments` arguments and its classes, read by the one dispatcher
    (`sources.load_source`): the evaluation commands' and the noise report's. `auto` takes the first of
    `_AUTO_FORMATS` in `formats` that fits, else an image folder, and writes it back to ``args``. With
    `keep_datasets`, the data stays a `datasets.Dataset` ("image", "label", "path" where the layout has files, and
    its other columns, which the noise report copies), else it becomes an `ImageLabelDataset`.
    """
    get = lambda name: getattr(args, f"{prefix}{name}")  # noqa: E731
    data_dir, data_format = get("data_dir"), get("data_format")
    path, split = Path(data_dir), get("split") or default_split
    if data_format == "auto":
        data_format = next(
            (name for name, found in _AUTO_FORMATS if name in formats and found(path, split)), "imagefolder"
        )
        setattr(args, f"{prefix}data_format", data_format)
    kind = "webvision" if data_format == "webvision_val" else data_format  # a root with only the val list
    dataset, id2label = load_source(
        kind, data_dir, "validation" if data_format == "webvision_val" else split,
        webvision_version=getattr(args, "webvision_version", "v1"), label_column=get("label_column"),
    )  # fmt: skip
    if kind == "webvision":  # ids are paths relative to the root, as officially; a val-only root names no class
        dataset = with_webvision_paths(dataset, path)
        if data_format == "webvision":
            dataset = dataset.cast_column("label", datasets.ClassLabel(names=list(id2label.values())))
    elif kind == "hf" and (get("image_column"), get("label_column")) != ("image", "label"):
        dataset = dataset.rename_columns({get("image_column"): "image", get("label_column"): "label"})
    if keep_datasets:
        return dataset, id2label
    return _image_label_dataset(dataset, kind, path, transform, get("id_column")), id2label


# `auto`'s choices in order: the first format whose test holds for (data folder, split).
_AUTO_FORMATS = (
    ("webvision", lambda path, split: (path / "info" / "train_filelist_google.txt").is_file()),
    ("webvision_val", lambda path, split: (path / "info" / VAL_FILELIST).exists()),
    ("shards", lambda path, split: (path / split).is_dir() and any((path / split).glob("shard-*.tar"))),
    ("hf", lambda path, split: is_saved_dataset(path) or not path.is_dir()),
)


__all__ = [
    "DATA_FORMATS",
    "ImageLabelDataset",
    "VOC07_CLASSES",
    "add_dataset_arguments",
    "apply_pseudo_labels",
    "check_class_names",
    "check_same_classes",
    "collate_skipping_bad_images",
    "collate_without_index",
    "dataset_from_arguments",
    "file_list_dataset",
    "hf_image_dataset",
    "image_dataset",
    "places205_dataset",
    "pseudo_label_dataset",
    "read_pseudo_labels",
    "result_key",
    "voc07_dataset",
    "webvision_val_dataset",
]
