"""WebVision in its native layout, as `datasets` datasets of image paths (decoded later by the collator).

Layout (as read by the official code)::

    root/info/train_filelist_google.txt   lines "google/q0001/img.jpg 0"  (paths relative to root)
    root/info/train_filelist_flickr.txt   lines "flickr/q0001/img.jpg 0"
    root/info/val_filelist.txt            lines "val000001.jpg 0"         (images under root/val_images_256/)
    root/info/synsets.txt                 optional, one class name per line, in label order

WebVision 1.0 training uses the first 1000 classes, 2.0 all 5000: lines with a label >= the class count are
dropped, as in the official loader. Sample ids are the positions in the kept list (Google list first).
"""

from __future__ import annotations

import bisect
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import Dataset, Features, IterableDataset, Value

logger = logging.getLogger(__name__)

WEBVISION_NUM_CLASSES = {"v1": 1000, "v2": 5000}
TRAIN_FILELISTS = ("train_filelist_google.txt", "train_filelist_flickr.txt")
VAL_FILELIST = "val_filelist.txt"
VAL_IMAGE_DIR = "val_images_256"

WEBVISION_FEATURES = Features({"image": Value("string"), "label": Value("int64"), "sample_id": Value("int64")})


def webvision_num_classes(version: str) -> int:
    """Returns the class count of a WebVision version ("v1": 1000, "v2": 5000).

    Raises:
        ValueError: Unknown version.
    """
    try:
        return WEBVISION_NUM_CLASSES[version.lower()]
    except KeyError:
        raise ValueError(
            f"unknown WebVision version {version!r}; expected one of {sorted(WEBVISION_NUM_CLASSES)}"
        ) from None


def _parse_line(line: bytes, where: str) -> tuple[str, int] | None:
    """Parses one "path label" line; returns None for blank lines."""
    text = line.decode("utf-8").strip()
    if not text:
        return None
    parts = text.rsplit(maxsplit=1)  # split from the right so a path with spaces survives
    if len(parts) != 2 or not parts[1].isdigit():
        raise ValueError(f"{where}: expected '<image path> <non-negative integer label>', got {text!r}")
    return parts[0], int(parts[1])


def _iter_kept_lines(path: Path, num_classes: int) -> Iterator[tuple[int, str, int]]:
    """Yields (byte offset, relative path, label) of the lines whose label is < num_classes.

    Binary mode gives exact byte offsets, which let streaming shards seek straight to their lines. Lines with a
    larger label are left out as the official loader does (training on the first ``num_classes`` classes), and
    counted in a warning naming the list, so that a list of the wrong version is not dropped in silence.
    """
    left_out = 0
    with open(path, "rb") as file:
        offset = 0
        for line in file:
            parsed = _parse_line(line, f"{path} (byte {offset})")
            if parsed is not None:
                if parsed[1] < num_classes:
                    yield offset, parsed[0], parsed[1]
                else:
                    left_out += 1
            offset += len(line)
    if left_out:
        logger.warning(
            "%s: %d line(s) with a label >= %d left out (the first %d classes are kept, as officially)",
            path, left_out, num_classes, num_classes,
        )  # fmt: skip


def _check_exists(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"WebVision file list not found: {path}")
    return path


def read_webvision_filelist(path: str | os.PathLike, num_classes: int) -> list[tuple[str, int]]:
    """Reads a WebVision file list, keeping lines whose label is below ``num_classes``.

    Args:
        path: A file with lines "relative/path.jpg label".
        num_classes: 1000 for WebVision 1.0 (first 1000 classes), 5000 for 2.0.

    Returns:
        ``(relative path, label)`` pairs in file order.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: A non-blank line is not "path non-negative-integer-label".
    """
    return [(rel, label) for _, rel, label in _iter_kept_lines(_check_exists(Path(path)), num_classes)]


def _split_sources(root: Path, split: str) -> list[tuple[Path, Path]]:
    """Returns (file list, directory its paths are relative to) pairs of a split, in sample-id order."""
    if split == "train":
        return [(_check_exists(root / "info" / name), root) for name in TRAIN_FILELISTS]
    if split in ("validation", "val"):
        return [(_check_exists(root / "info" / VAL_FILELIST), root / VAL_IMAGE_DIR)]
    raise ValueError(f"unknown WebVision split {split!r}; expected 'train' or 'validation'")


def read_webvision_class_names(root: str | os.PathLike, num_classes: int) -> dict[int, str]:
    """Returns id2label from ``root/info/synsets.txt`` when present, else generic ``class_<i>`` names.

    Synset lines ("n01440764 tench, Tinca tinca") are kept whole: the WordNet id keeps the names unique.
    """
    synsets = Path(root) / "info" / "synsets.txt"
    if synsets.is_file():
        names = [line.strip() for line in synsets.read_text(encoding="utf-8").splitlines() if line.strip()]
        if len(names) >= num_classes:
            return dict(enumerate(names[:num_classes]))
    return {index: f"class_{index}" for index in range(num_classes)}


@dataclass(frozen=True)
class _Shard:
    """A streaming shard: the kept lines it reads, in reading order, as rows (sample id, byte offset).

    ``first_sample_ids[i]`` is the id of the first kept line of ``filelists[i]``: ids are positions in the kept
    lists, Google first, whatever order the shard reads them in.
    """

    filelists: tuple[str, ...]
    image_dirs: tuple[str, ...]
    first_sample_ids: tuple[int, ...]
    rows: np.ndarray  # (n, 2) int64


def _plan_shards(
    sources: list[tuple[Path, Path]], num_classes: int, num_shards: int, shuffle_seed: int | None
) -> list[_Shard]:
    """Splits the kept lines of all file lists into ``num_shards`` nearly equal shards.

    With ``shuffle_seed``, the lines are dealt to the shards in a seeded random order over all file lists: the
    lists are sorted by class, and a shard of consecutive lines would hold a handful of classes, which no shuffle
    buffer can mix (BENCHMARKS.md, "Class diversity of streaming batches"). Shards hold byte offsets (16 bytes a
    line: ~40 MB for WebVision 1.0), not paths, so they stay small to pickle into DataLoader workers and ranks.
    """
    offsets = [np.fromiter((o for o, _, _ in _iter_kept_lines(path, num_classes)), np.int64) for path, _ in sources]
    counts = [len(o) for o in offsets]
    total = sum(counts)
    ids = np.arange(total) if shuffle_seed is None else np.random.default_rng(shuffle_seed).permutation(total)
    rows = np.stack([ids, np.concatenate(offsets)[ids]], axis=1)  # (total, 2)
    first_sample_ids = tuple(int(first) for first in np.cumsum([0, *counts[:-1]]))
    filelists = tuple(str(path) for path, _ in sources)
    image_dirs = tuple(str(image_dir) for _, image_dir in sources)
    return [
        _Shard(filelists, image_dirs, first_sample_ids, chunk)
        for chunk in np.array_split(rows, max(min(num_shards, total), 1))
    ]


def _generate_from_shards(shards: list[_Shard], num_classes: int) -> Iterator[dict]:
    for shard in shards:
        files = [open(path, "rb") for path in shard.filelists]  # noqa: SIM115 (closed below)
        try:
            for sample_id, offset in shard.rows.tolist():
                source = bisect.bisect_right(shard.first_sample_ids, sample_id) - 1
                files[source].seek(offset)
                rel, label = _parse_line(files[source].readline(), f"{shard.filelists[source]} (byte {offset})")
                yield {"image": os.path.join(shard.image_dirs[source], rel), "label": label, "sample_id": sample_id}
        finally:
            for file in files:
                file.close()


def load_webvision(
    root: str | os.PathLike,
    version: str = "v1",
    split: str = "train",
    streaming: bool = False,
    num_shards: int = 64,
    shuffle_seed: int | None = None,
) -> Dataset | IterableDataset:
    """Loads a WebVision split as a dataset of image paths.

    Args:
        root: The WebVision root (holding ``info/``).
        version: "v1" (1000 classes) or "v2" (5000 classes).
        split: "train" (Google + Flickr lists) or "validation" (``val_images_256``).
        streaming: Return an ``IterableDataset`` of ``num_shards`` shards instead of an in-memory ``Dataset``.
            Accelerate splits whole shards across ranks when ``n_shards >= world_size`` (balanced when it is a
            multiple), and DataLoader workers split each rank's shards again: pick a multiple of
            ``world_size * num_workers``.
        num_shards: Shard count when streaming.
        shuffle_seed: When streaming, deal the lines to the shards in this seeded random order, so that every
            shard holds every class (the file lists are sorted by class); None keeps the file order.

    Returns:
        Columns ``image`` (absolute or root-relative file path string), ``label`` (int), ``sample_id`` (int).

    Raises:
        ValueError: Unknown version or split, malformed file list.
        FileNotFoundError: A file list is missing.
    """
    num_classes = webvision_num_classes(version)
    root = Path(root)
    sources = _split_sources(root, split)
    if streaming:
        shards = _plan_shards(sources, num_classes, num_shards, shuffle_seed)
        return IterableDataset.from_generator(
            _generate_from_shards,
            features=WEBVISION_FEATURES,
            gen_kwargs={"shards": shards, "num_classes": num_classes},
        )
    columns: dict[str, list] = {"image": [], "label": [], "sample_id": []}
    for filelist, image_dir in sources:
        for rel, label in read_webvision_filelist(filelist, num_classes):
            columns["sample_id"].append(len(columns["image"]))
            columns["image"].append(os.path.join(image_dir, rel))
            columns["label"].append(label)
    return Dataset.from_dict(columns, features=WEBVISION_FEATURES)
