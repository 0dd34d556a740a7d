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

import os
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from datasets import Dataset, Features, IterableDataset, Value

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


def _iter_kept_lines(path: Path, num_classes: int, start_offset: int = 0) -> Iterator[tuple[int, str, int]]:
    """Yields (byte offset, relative path, label) of the lines whose label is < num_classes.

    Binary mode gives exact byte offsets, which let streaming shards seek straight to their first line.
    """
    with open(path, "rb") as file:
        file.seek(start_offset)
        offset = start_offset
        for line in file:
            parsed = _parse_line(line, f"{path} (byte {offset})")
            if parsed is not None and parsed[1] < num_classes:
                yield offset, parsed[0], parsed[1]
            offset += len(line)


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
class _ShardSegment:
    """A run of ``count`` kept lines of one file list, starting at byte ``start_offset``."""

    filelist: str
    image_dir: str
    start_offset: int
    count: int


@dataclass(frozen=True)
class _Shard:
    """A streaming shard: consecutive segments whose samples get ids from ``first_sample_id`` on."""

    segments: tuple[_ShardSegment, ...]
    first_sample_id: int


def _plan_shards(sources: list[tuple[Path, Path]], num_classes: int, num_shards: int) -> list[_Shard]:
    """Splits the kept lines of all file lists into ``num_shards`` nearly equal shards of byte ranges.

    Shards only hold offsets and counts, so they are tiny to pickle into DataLoader workers and ranks, and
    memory stays flat whatever the size of the file lists.
    """
    counts = [sum(1 for _ in _iter_kept_lines(filelist, num_classes)) for filelist, _ in sources]
    total = sum(counts)
    if total == 0:
        return [_Shard(segments=(), first_sample_id=0)]
    num_shards = min(num_shards, total)
    boundaries = [shard * total // num_shards for shard in range(num_shards + 1)]
    shards: list[_Shard] = []
    segments: list[_ShardSegment] = []
    next_shard = 1  # index into boundaries of the end of the shard being filled
    sample_id = 0
    for (filelist, image_dir), count in zip(sources, counts, strict=True):
        if count == 0:
            continue
        segment_start, segment_count = None, 0
        for offset, _, _ in _iter_kept_lines(filelist, num_classes):
            if segment_start is None:
                segment_start = offset
            segment_count += 1
            sample_id += 1
            if sample_id == boundaries[next_shard]:
                segments.append(_ShardSegment(str(filelist), str(image_dir), segment_start, segment_count))
                shards.append(_Shard(tuple(segments), boundaries[next_shard - 1]))
                segments, segment_start, segment_count = [], None, 0
                next_shard += 1
        if segment_count:  # the shard continues in the next file list
            segments.append(_ShardSegment(str(filelist), str(image_dir), segment_start, segment_count))
    return shards


def _generate_from_shards(shards: list[_Shard], num_classes: int) -> Iterator[dict]:
    for shard in shards:
        sample_id = shard.first_sample_id
        for segment in shard.segments:
            lines = _iter_kept_lines(Path(segment.filelist), num_classes, segment.start_offset)
            for _, rel, label in islice(lines, segment.count):
                yield {"image": os.path.join(segment.image_dir, rel), "label": label, "sample_id": sample_id}
                sample_id += 1


def load_webvision(
    root: str | os.PathLike,
    version: str = "v1",
    split: str = "train",
    streaming: bool = False,
    num_shards: int = 64,
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
        shards = _plan_shards(sources, num_classes, num_shards)
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
